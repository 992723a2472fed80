"""Reward terms: the named parts of a response's reward, each normalised within its prompt group and weighted
(spec §3.3, "per-reward decoupled normalisation"; dUltra's step-count and distillation rewards, §8.3).

A term maps a scored `RolloutBatch` (texts, accuracy, TPF, forwards, prompts) to one raw value per response; the
pipeline normalises it per group (``normalize``) and multiplies by ``weight``; the total reward is the sum of the
shaped terms, in list order. Configured as ``data.init_args.rewards``, a list of ``{class_path, init_args}``::

    rewards:
      - class_path: lrl.rewards.terms.Accuracy        # ±1, unnormalised (the paper)
      - class_path: lrl.rewards.terms.TPF             # tokens per forward, z-scored per group
        init_args: {weight: 1.0, normalize: z_score}

A new reward is one subclass with a ``name`` and a ``raw(batch)`` method, and one list entry (docs/rewards.md).
"""

from __future__ import annotations

import importlib
import math
from typing import Literal

import torch
from torch import Tensor

from lrl.algorithms.reward_shaping import NormMode, accuracy_reward, group_normalize
from lrl.rollout.types import RolloutBatch

RESERVED = ("total",)


class RewardTerm:
    """One named term of the reward: ``weight · normalize_G(raw(batch))`` per response.

    Args:
        weight: multiplies the normalised term (0 logs the term without it counting).
        normalize: per-group normalisation of the raw values: ``z_score`` (population std; 0 in a flat group),
            ``minmax`` (0.5 in a flat group) or ``none`` (`lrl.algorithms.reward_shaping.group_normalize`).
        name: the key of the term in ``RolloutBatch.rewards`` and the logs (``reward/<name>/mean``, and
            ``reward/<name>_raw/mean`` before normalisation); default the class's ``name``.
    """

    name: str = ""

    def __init__(self, weight: float = 1.0, normalize: NormMode = "z_score", name: str | None = None):
        if not math.isfinite(float(weight)):
            raise ValueError(f"data.init_args.rewards: {type(self).__name__}.weight must be finite, got {weight}")
        if normalize not in self.modes():
            raise ValueError(f"data.init_args.rewards: {type(self).__name__}.normalize must be one of "
                             f"{', '.join(self.modes())}, got {normalize!r}")
        self.weight = float(weight)
        self.normalize = normalize
        self.name = name or type(self).name
        if not self.name or self.name in RESERVED or self.name.endswith("_raw"):
            raise ValueError(f"data.init_args.rewards: {type(self).__name__} needs a name other than "
                             f"{self.name!r} (not 'total', not ending in '_raw')")

    @classmethod
    def modes(cls) -> tuple[str, ...]:
        return ("z_score", "minmax", "none")

    def raw(self, batch: RolloutBatch) -> Tensor:
        """(N,) float raw value of every response of ``batch`` (its verifier fields are filled already)."""
        raise NotImplementedError(f"{type(self).__name__}.raw")

    def shape(self, raw: Tensor, group_index: Tensor) -> Tensor:
        """(N,) float32 ``weight · normalize_G(raw)``."""
        return group_normalize(raw, group_index, self.normalize, self.weight)

    def unnormalized(self, raw: Tensor) -> Tensor:
        """(N,) float32 ``weight · raw``: the term's part of the sum that ``joint_normalization`` normalises once."""
        return self.weight * raw.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight}, normalize={self.normalize!r})"


class Accuracy(RewardTerm):
    """The verifier's accuracy (math correct 0/1 or code pass rate; responses that hit the length limit count 0
    under ``data.init_args.truncated_is_wrong``).

    Args:
        normalize: ``pm1`` (the paper: 2a − 1, unnormalised), ``z_score`` (the released config), ``minmax`` or
            ``none`` (the raw accuracy).
    """

    name = "acc"

    def __init__(self, weight: float = 1.0, normalize: Literal["pm1", "z_score", "minmax", "none"] = "pm1",
                 name: str | None = None):
        super().__init__(weight, normalize, name)

    @classmethod
    def modes(cls) -> tuple[str, ...]:
        return ("pm1", "z_score", "minmax", "none")

    def raw(self, batch: RolloutBatch) -> Tensor:
        return batch.accuracy.float()

    def shape(self, raw: Tensor, group_index: Tensor) -> Tensor:
        if self.normalize == "pm1":
            return self.weight * accuracy_reward(raw, group_index, "pm1")
        return super().shape(raw, group_index)

    def unnormalized(self, raw: Tensor) -> Tensor:
        return self.weight * ((2 * raw.double() - 1).float() if self.normalize == "pm1" else raw.float())


class TPF(RewardTerm):
    """Tokens per forward of each response (the paper's count, `RolloutBatch.tpf`): the speed reward."""

    name = "tpf"

    def raw(self, batch: RolloutBatch) -> Tensor:
        return batch.tpf.float()


class PlannerSteps(RewardTerm):
    """dUltra's step-count reward: −forwards / scale (``linear``, dUltra's −#steps / 50) or −√forwards / scale
    (``sqrt``) per response (`RolloutBatch.num_forwards`).

    Args:
        kind: ``linear`` or ``sqrt``.
        scale: the divisor c (> 0).
    """

    name = "steps"

    def __init__(self, weight: float = 1.0, normalize: NormMode = "none", name: str | None = None,
                 kind: Literal["linear", "sqrt"] = "linear", scale: float = 50.0):
        super().__init__(weight, normalize, name)
        if kind not in ("linear", "sqrt"):
            raise ValueError(f"data.init_args.rewards: PlannerSteps.kind must be 'linear' or 'sqrt', got {kind!r}")
        if not scale > 0:
            raise ValueError(f"data.init_args.rewards: PlannerSteps.scale must be > 0, got {scale}")
        self.kind, self.scale = kind, float(scale)

    def raw(self, batch: RolloutBatch) -> Tensor:
        from lrl.algorithms.dultra_rewards import step_count_raw

        return step_count_raw(batch.num_forwards, kind=self.kind, scale=self.scale)  # float64, as dUltra's code


class Distill(RewardTerm):
    """dUltra's distillation reward: the mean log-prob of each completion given its prompt under a local
    causal-LM teacher with its own tokenizer (`lrl.rewards.distill.TeacherScorer`, loaded at the first step).

    Args:
        teacher: the teacher's checkpoint directory.
    """

    name = "distill"

    def __init__(self, teacher: str, weight: float = 1.0, normalize: NormMode = "z_score", name: str | None = None):
        super().__init__(weight, normalize, name)
        self.teacher = teacher
        self._scorer = None

    def raw(self, batch: RolloutBatch) -> Tensor:
        from lrl.rewards import distill

        if self._scorer is None:
            self._scorer = distill.TeacherScorer(self.teacher)
        prompts = [batch.prompts[int(g)] for g in batch.group_index]
        return self._scorer.score(prompts, batch.texts)


class Function(RewardTerm):
    """A user's reward function by import path: ``function(batch) -> N floats`` (a tensor or a list), one per
    response of the `RolloutBatch` (texts, prompts per group, ground truths, accuracy, TPF, forwards).

    Args:
        function: ``package.module.function``.
        name: the term's key in the rewards and the logs.
    """

    def __init__(self, function: str, name: str, weight: float = 1.0, normalize: NormMode = "z_score"):
        super().__init__(weight, normalize, name)
        module, _, attr = function.rpartition(".")
        try:
            self._fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"data.init_args.rewards: Function.function={function!r} does not import") from None
        self.function = function

    def raw(self, batch: RolloutBatch) -> Tensor:
        v = torch.as_tensor(self._fn(batch), dtype=torch.float64).flatten()
        if v.numel() != len(batch):
            raise ValueError(f"data.init_args.rewards: {self.function} returned {v.numel()} values for "
                             f"{len(batch)} responses")
        return v


def default_terms() -> list[RewardTerm]:
    """The paper's reward: ±1 accuracy + per-group z-scored TPF."""
    return [Accuracy(), TPF()]


def check_terms(terms: list[RewardTerm]) -> None:
    """Terms are `RewardTerm` instances with distinct names (the keys they fill must not collide); at least one."""
    if not terms:
        raise ValueError("data.init_args.rewards is empty: every response's reward would be 0 (null: the paper's)")
    seen = set()
    for t in terms:
        if not isinstance(t, RewardTerm):
            raise ValueError(f"data.init_args.rewards: {t!r} is not a lrl.rewards.terms.RewardTerm")
        if t.name in seen:
            raise ValueError(f"data.init_args.rewards: two terms named {t.name!r}: give one a `name`")
        seen.add(t.name)


def reward_names(terms: list[RewardTerm]) -> list[str]:
    """The keys `shape_terms` fills, in a fixed order (the same on every rank)."""
    return [*(f"{t.name}_raw" for t in terms), *(t.name for t in terms), "total"]


def shape_terms(terms: list[RewardTerm], batch: RolloutBatch,
                joint: NormMode | None = None) -> dict[str, Tensor]:
    """Every term's raw and shaped values and the total (N,) float32 each (spec §3.3).

    Decoupled (``joint`` None): ``total = Σ_k weight_k · normalize_k,G(raw_k)``, summed in list order.
    Joint (the ablation): ``total = normalize_joint,G(Σ_k weight_k · raw_k)`` (accuracy under ``pm1`` as 2a − 1);
    then each term's entry holds its unnormalised part of the sum.
    """
    gi = batch.group_index
    out: dict[str, Tensor] = {}
    parts = []
    for t in terms:
        raw = t.raw(batch)
        out[f"{t.name}_raw"] = raw.float()
        parts.append(t.unnormalized(raw) if joint is not None else t.shape(raw, gi))
    for t, part in zip(terms, parts):
        out[t.name] = part
    if joint is not None:
        total = torch.zeros(len(gi), dtype=torch.float64)
        for part in parts:
            total = total + part.double()
        out["total"] = group_normalize(total, gi, joint)
    else:
        total = parts[0] if parts else torch.zeros(len(gi))
        for part in parts[1:]:
            total = total + part
        out["total"] = total
    return {k: out[k] for k in reward_names(terms)}
