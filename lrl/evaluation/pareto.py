"""The speed–quality evaluation: accuracy and TPF over decoding thresholds, summarised by AUP (spec §6).

One point per decoding setting: the static 1-token-per-step anchor (TPF = 1 by construction) and the dynamic
strategy at each threshold φ. Decoding is greedy, as in the paper's evaluation. AUP follows d3LLM's definition
(`lrl.metrics.aup`) over all points; the y_max used is recorded, and the single-point ρ·y at each threshold is
kept for comparison with the paper's tables (which cannot be rebuilt from single points, spec §6.3).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lrl.atomic import atomic_write
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import SamplingParams


@dataclass
class ParetoPoint:
    """One decoding setting's result. ``threshold`` is None for the static 1-token-per-step anchor."""

    setting: str
    threshold: float | None
    accuracy: float  # percent
    tpf: float  # Σ tokens / Σ forwards, the paper's count (spec §2.5; AUP uses it)
    tokens: int  # up to and including each stop token (docs/metrics.md)
    forwards: int  # paper's count: distinct step ids of the returned tokens
    store_passes: int
    wall_s: float
    num_responses: int
    # per answer style (tasks with `response_style`): share, accuracy (%), tpf, forwards and tokens per response
    styles: dict[str, dict[str, float]] = field(default_factory=dict)
    # % of responses with the right final answer whose worked steps also hold (tasks with `worked_steps_hold`):
    # the verifier reads only the final answer, and a small model can box the right total over wrong steps
    sound_accuracy: float | None = None
    # denoising forwards that ran, the truncated final block's tail included (`RolloutBatch.forwards_spent`)
    forwards_spent: int | None = None

    @property
    def tpf_spent(self) -> float | None:
        """Σ tokens ÷ Σ spent forwards (None for results written before the spent count existed)."""
        if self.forwards_spent is None:
            return None
        return self.tokens / self.forwards_spent if self.forwards_spent else 0.0

    @property
    def forwards_per_response(self) -> float:
        """Mean denoising forwards per response: the latency a user feels (a TPF gain from longer answers shows)."""
        return self.forwards / max(self.num_responses, 1)

    @property
    def tokens_per_response(self) -> float:
        return self.tokens / max(self.num_responses, 1)


@dataclass
class ParetoResult:
    points: list[ParetoPoint]
    aup: float
    y_max: float
    frontier: list[int] = field(default_factory=list)
    # (tpf, accuracy) points AUP left out: more than 5 points below the lowest-TPF point's accuracy (d3LLM refuses
    # such a curve; the AUP above is of the remaining points)
    aup_dropped: list[tuple[float, float]] = field(default_factory=list)

    def point(self, threshold: float | None) -> ParetoPoint | None:
        for p in self.points:
            if p.threshold == threshold:
                return p
        return None

    def to_dict(self) -> dict:
        return {
            "points": [asdict(p) for p in self.points],
            "aup": self.aup,
            "y_max": self.y_max,
            "frontier": self.frontier,
            "aup_dropped": [list(p) for p in self.aup_dropped],
        }


def run_pareto_sweep(
    generator: RolloutGenerator,
    task,
    records: list[dict],
    *,
    thresholds: list[float],
    block_size: int,
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...],
    static_anchor: bool = True,
    y_max: float | None = None,
    eos_policy: str = "truncate",
    planner_thresholds: list[float] = (),
    rank: int = 0,
    world_size: int = 1,
    all_gather_object: Callable[[object], list] | None = None,
) -> ParetoResult:
    """Decode ``records`` greedily at every setting and score them with ``task.score``.

    With ``world_size`` > 1 each rank decodes the records ``rank, rank + world_size, …`` and the per-record
    results (text, score, tokens, forwards) are gathered with ``all_gather_object`` (one object per rank, in rank
    order; a collective) before any figure is computed, so every rank returns the result one process would.

    Args:
        generator: the rollout generator (its current weights are evaluated).
        task: a `lrl.tasks.Task` (prompt template and verifier).
        records: evaluation records of the task.
        thresholds: confidence thresholds of the dynamic strategy.
        block_size, max_new_tokens, stop_token_ids: decoding settings shared by all points.
        static_anchor: add the 1-token-per-step point (static strategy, block_size steps per block).
        y_max: accuracy used by AUP's weighting (None: best accuracy among these points).
        planner_thresholds: also decode with the dUltra ``planner`` strategy (greedy: unmask where p_i >= t), one
            point ``planner@t`` per value; the model needs a planner head. Their ``threshold`` field holds t.
        rank, world_size, all_gather_object: the split across ranks (above); ``torch.distributed``'s
            ``all_gather_object`` semantics (returns the list of every rank's object).
    """
    import warnings

    from lrl.metrics import pareto_frontier
    from lrl.metrics.aup import AUPPointsDropped, aup_details

    if not records:
        raise ValueError("run_pareto_sweep: no evaluation records")
    if world_size > 1 and all_gather_object is None:
        raise ValueError("run_pareto_sweep: world_size > 1 needs all_gather_object")
    mine = list(range(rank, len(records), world_size))
    prompts = [task.prompt(records[i]) for i in mine]
    settings: list[tuple[str, float | None, SamplingParams]] = []
    common = dict(
        block_size=block_size,
        greedy=True,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_token_ids,
        samples_per_prompt=1,
        eos_policy=eos_policy,
    )
    if static_anchor:
        settings.append(
            (
                "static_1tok",
                None,
                SamplingParams(remasking_strategy="low_confidence_static", denoising_steps=block_size, **common),
            )
        )
    for t in thresholds:
        settings.append(
            (
                f"dynamic@{t:g}",
                float(t),
                SamplingParams(remasking_strategy="low_confidence_dynamic", threshold=float(t), **common),
            )
        )
    for t in planner_thresholds:
        settings.append(
            (f"planner@{t:g}", float(t),
             SamplingParams(remasking_strategy="planner", planner_threshold=float(t), **common))
        )
    points = []
    for name, thr, sp in settings:
        start = time.perf_counter()
        rows = _decode_rows(generator, task, [records[i] for i in mine], mine, prompts, sp)
        wall = time.perf_counter() - start
        if world_size > 1:  # every rank's rows, back in record order; the slowest rank's wall time
            gathered = all_gather_object((rows, wall))
            rows = sorted((r for part, _ in gathered for r in part), key=lambda r: r.index)
            wall = max(w for _, w in gathered)
        batch = _Rows(rows)
        scores = [r.score for r in rows]
        acc = 100.0 * sum(float(s) >= 1.0 for s in scores) / len(scores)
        points.append(
            ParetoPoint(
                setting=name,
                threshold=thr,
                accuracy=acc,
                tpf=batch.batch_tpf,
                tokens=int(batch.response_lengths.sum()),
                forwards=int(batch.num_forwards.sum()),
                store_passes=sum(r.store_passes for r in rows),
                wall_s=wall,
                num_responses=len(batch),
                styles=style_breakdown(task, batch, scores),
                sound_accuracy=sound_accuracy(task, batch.texts, scores),
                forwards_spent=sum(r.forwards_spent for r in rows),
            )
        )
    curve = [(p.tpf, p.accuracy) for p in points]
    best = max(p.accuracy for p in points)
    ymax = y_max if y_max is not None else best
    value, dropped = aup_details(curve, y_max=ymax) if ymax > 0 else (0.0, [])
    if dropped:
        warnings.warn(f"AUP leaves out {len(dropped)} point(s) (tpf, accuracy) {dropped}: more than 5 points below "
                      "the accuracy of the lowest-TPF point (d3LLM's get_aup refuses the curve); pareto.json lists "
                      "them under aup_dropped", AUPPointsDropped, stacklevel=2)
    return ParetoResult(points=points, aup=value, y_max=ymax, frontier=pareto_frontier(curve), aup_dropped=dropped)


@dataclass
class _Row:
    """One record's result at one decoding setting (what ranks exchange)."""

    index: int
    text: str
    score: float
    tokens: int
    forwards: int
    store_passes: int
    forwards_spent: int


def _decode_rows(generator, task, records, indices, prompts, sp) -> list[_Row]:
    """Decode and score this rank's ``records`` (global ``indices``); an empty share decodes nothing."""
    if not records:
        return []
    batch = generator.generate(prompts, sp)
    scores = task.score(batch.texts, records)
    spent = batch.forwards_spent
    return [_Row(i, batch.texts[j], float(scores[j]), int(batch.response_lengths[j]), int(batch.num_forwards[j]),
                 int(batch.num_store_passes[j]), int(spent[j])) for j, i in enumerate(indices)]


class _Rows:
    """The gathered rows seen as the parts of a `RolloutBatch` that the figures read."""

    def __init__(self, rows: list[_Row]):
        import torch

        self.texts = [r.text for r in rows]
        self.response_lengths = torch.tensor([r.tokens for r in rows], dtype=torch.long)
        self.num_forwards = torch.tensor([r.forwards for r in rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def batch_tpf(self) -> float:  # = RolloutBatch.batch_tpf: Σ tokens ÷ Σ forwards
        total = int(self.num_forwards.sum())
        return float(self.response_lengths.sum()) / total if total else 0.0


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` in rank order (``torch.distributed.all_gather_object``; a collective)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sound_accuracy(task, texts, scores) -> float | None:
    """% of ``texts`` scored correct whose worked steps hold (``task.worked_steps_hold``); None for tasks without
    the check or an empty batch."""
    check = getattr(task, "worked_steps_hold", None)
    if check is None or not len(texts):
        return None
    return 100.0 * sum(float(s) >= 1.0 and check(t) for t, s in zip(texts, scores)) / len(texts)


def style_breakdown(task, batch, scores) -> dict[str, dict[str, float]]:
    """Per answer style of ``task`` (empty when it has no ``response_style``): share of responses, accuracy (%),
    TPF (Σ tokens ÷ Σ forwards), forwards and tokens per response, and with ``task.worked_steps_hold`` the
    sound accuracy (% of the style's responses that are right over steps that hold)."""
    classify = getattr(task, "response_style", None)
    if classify is None or not len(batch):
        return {}
    labels = [classify(t) for t in batch.texts]
    check = getattr(task, "worked_steps_hold", None)
    out = {}
    for name in (*getattr(task, "style_names", ()), *sorted(set(labels) - set(getattr(task, "style_names", ())))):
        rows = [i for i, lab in enumerate(labels) if lab == name]
        tokens = sum(int(batch.response_lengths[i]) for i in rows)
        forwards = sum(int(batch.num_forwards[i]) for i in rows)
        n = max(len(rows), 1)
        out[name] = {
            "share": len(rows) / len(labels),
            "accuracy": 100.0 * sum(float(scores[i]) >= 1.0 for i in rows) / n,
            "tpf": tokens / forwards if forwards else 0.0,
            "forwards_per_response": forwards / n,
            "tokens_per_response": tokens / n,
        }
        if check is not None:
            out[name]["sound_accuracy"] = sound_accuracy(task, [batch.texts[i] for i in rows],
                                                         [scores[i] for i in rows]) or 0.0
    return out


def format_table(result: ParetoResult) -> str:
    """A Markdown table of the sweep (one row per decoding setting) plus the AUP line."""
    rows = [
        "| setting | accuracy % | sound steps % | TPF | tokens | forwards | forwards/response | TPF spent | "
        "forwards spent | styles | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result.points:
        styles = " ".join(f"{k} {v['share']:.0%}" for k, v in p.styles.items() if v["share"] > 0) or "-"
        sound = "-" if p.sound_accuracy is None else f"{p.sound_accuracy:.1f}"
        spent = "-" if p.forwards_spent is None else str(p.forwards_spent)
        spent_tpf = "-" if p.tpf_spent is None else f"{p.tpf_spent:.2f}"
        rows.append(
            f"| {p.setting} | {p.accuracy:.1f} | {sound} | {p.tpf:.2f} | {p.tokens} | {p.forwards} | "
            f"{p.forwards_per_response:.2f} | {spent_tpf} | {spent} | {styles} | {p.wall_s:.1f} |"
        )
    if result.aup_dropped:
        rows.append(f"\nAUP leaves out {len(result.aup_dropped)} point(s) more than 5 points below the lowest-TPF "
                    f"point's accuracy (d3LLM refuses such a curve): {result.aup_dropped}")
    rows.append(f"\nAUP = {result.aup:.1f} (y_max = {result.y_max:.1f}; d3LLM definition, α = 3; TPF and forwards in "
                "the paper's count, spent forwards add the decoded tail after a mid-block stop: docs/metrics.md)")
    return "\n".join(rows)


def provenance(base_checkpoint: str, ckpt_path: str | None) -> dict[str, str | None]:
    """pareto.json's record of what was evaluated: ``checkpoint`` = the weights evaluated (``--ckpt_path`` when
    given, else the base), ``base_checkpoint`` = the config's ``--checkpoint`` (architecture and tokenizer)."""
    return {"checkpoint": str(ckpt_path) if ckpt_path else str(base_checkpoint),
            "base_checkpoint": str(base_checkpoint), "ckpt_path": str(ckpt_path) if ckpt_path else None}


def plot_pareto(result: ParetoResult, title: str = "accuracy vs TPF", baseline: ParetoResult | None = None):
    """A matplotlib Figure: accuracy (%) against TPF, frontier highlighted, optional baseline curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=110)
    for res, label, color in ((baseline, "base", "tab:gray"), (result, "policy", "tab:blue")):
        if res is None:
            continue
        pts = sorted(res.points, key=lambda p: p.tpf)
        ax.plot(
            [p.tpf for p in pts],
            [p.accuracy for p in pts],
            "o-",
            color=color,
            alpha=0.5,
            label=f"{label} (AUP {res.aup:.1f})",
        )
        front = [res.points[i] for i in res.frontier]
        ax.plot([p.tpf for p in front], [p.accuracy for p in front], "o", color=color, markersize=8)
        for p in pts:
            ax.annotate(
                p.setting.replace("dynamic@", "φ="),
                (p.tpf, p.accuracy),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_pareto(
    result: ParetoResult,
    out_dir: str | os.PathLike,
    *,
    title: str = "accuracy vs TPF",
    baseline: ParetoResult | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``pareto.json`` and ``pareto.png`` atomically into ``out_dir``; returns both paths."""
    import io

    out = Path(out_dir)
    payload = result.to_dict()
    if extra:
        payload.update(extra)
    json_path, png_path = out / "pareto.json", out / "pareto.png"
    atomic_write(json_path, json.dumps(payload, indent=2).encode())
    fig = plot_pareto(result, title=title, baseline=baseline)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write(png_path, buf.getvalue())
    return json_path, png_path
