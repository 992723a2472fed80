"""`EvalConfig`: the settings of the Pareto evaluation (`model.init_args.eval`), one typed group."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """How the validation / Pareto sweep decodes (spec §6; docs/evaluation.md).

    Args:
        thresholds: dynamic thresholds of the sweep (one point each).
        max_new_tokens: generation budget of every point.
        static_anchor: include the 1-token-per-step anchor.
        planner_thresholds: also sweep the greedy dUltra planner at these p thresholds (``planner@t`` points;
            needs a planner head).
        max_rows: most rows the evaluation engine decodes at once (None: ``data.init_args.rollout.max_rows``).
        kv_cache_gb: the evaluation engine's KV budget in GB per rank (None: ``data.init_args.rollout.kv_cache_gb``,
            the rollout's budget, so the evaluation needs no more memory than a rollout).
        transient_gb: bound of the evaluation engine's per-forward transients in GB (None: the rollout's
            ``transient_gb``).
    """

    thresholds: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.8, 0.7, 0.5])
    max_new_tokens: int = 256
    static_anchor: bool = True
    planner_thresholds: list[float] = field(default_factory=list)
    max_rows: int | None = None
    kv_cache_gb: float | None = None
    transient_gb: float | None = None

    def check(self, key: str = "model.init_args.eval") -> None:
        """Range checks, each error naming the key as a user writes it."""
        bad = [t for t in self.thresholds if not 0.0 <= float(t) <= 1.0]
        if bad or not self.thresholds:
            raise ValueError(f"{key}.thresholds must be a non-empty list of values in [0, 1], got {self.thresholds}")
        bad = [t for t in self.planner_thresholds if not 0.0 <= float(t) <= 1.0]
        if bad:
            raise ValueError(f"{key}.planner_thresholds must lie in [0, 1], got {bad}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"{key}.max_new_tokens must be an int >= 1, got {self.max_new_tokens}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"{key}.max_rows must be >= 1 (or null: the rollout's), got {self.max_rows}")
        for name in ("kv_cache_gb", "transient_gb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{key}.{name} must be > 0 (or null: the rollout's), got {value}")


    def engine_bounds(self, rollout=None) -> dict:
        """The evaluation engine's ``max_rows`` / ``kv_cache_gb`` / ``transient_gb``: these settings where given,
        else the rollout's (``rollout``: a `datamodules.rollout.RolloutBackend`, or None: the engine's defaults),
        so the evaluation never needs more memory than the budget the plan counts for it."""
        pick = {k: getattr(self, k) if getattr(self, k) is not None else getattr(rollout, k, None)
                for k in ("max_rows", "kv_cache_gb", "transient_gb")}
        return {k: v for k, v in pick.items() if v is not None}


def as_eval_config(value) -> EvalConfig:
    """``model.init_args.eval`` as given (an `EvalConfig`, a dict, a jsonargparse Namespace or None) → `EvalConfig`."""
    if value is None:
        return EvalConfig()
    if isinstance(value, EvalConfig):
        return value
    items = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    known = set(EvalConfig.__dataclass_fields__)
    unknown = sorted(set(items) - known)
    if unknown:
        raise ValueError(f"model.init_args.eval: unknown key(s) {unknown}; known: {sorted(known)}")
    return EvalConfig(**items)
