"""TPF-aware group filters: keep or drop whole prompt groups before training (spec §3.4).

Rules, applied in this order; a group that several rules would drop is counted once, under the first:

1. ``all_wrong``: no response of the group is correct (after the over-length override).
2. ``tpf_range``: ``max TPF − min TPF < tpf_range_threshold`` (the speed reward cannot separate the responses).
3. ``zero_std`` (off by default, not in the released code): the total reward is flat within the group
   (population std ≤ 1e-6), so every advantage of the group would be 0 under group normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lrl.algorithms.reward_shaping import FLAT_TOL, check_grouped, group_mean_std, group_reduce


@dataclass(frozen=True)
class FilterResult:
    """Which prompt groups survive the filters.

    Attributes:
        kept: (K,) long ids of the kept groups (values of ``group_index``), ascending.
        keep_rows: (N,) bool, True for responses of kept groups.
        num_groups: Distinct groups seen.
        dropped_all_wrong: Groups dropped by rule 1.
        dropped_tpf_range: Groups dropped by rule 2 (and not rule 1).
        dropped_zero_std: Groups dropped by rule 3 (and not rules 1–2).
    """

    kept: Tensor
    keep_rows: Tensor
    num_groups: int
    dropped_all_wrong: int
    dropped_tpf_range: int
    dropped_zero_std: int

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())


def filter_groups(
    correct: Tensor,
    tpf: Tensor,
    rewards_total: Tensor,
    group_index: Tensor,
    *,
    all_wrong: bool = True,
    tpf_range_threshold: float | None = 0.01,
    zero_std: bool = False,
) -> FilterResult:
    """Apply the group filters of spec §3.4 (rules and counting order in the module docstring).

    Args:
        correct: (N,) bool verifier outcome (code: all tests passed).
        tpf: (N,) float tokens per forward.
        rewards_total: (N,) float total reward (used by ``zero_std`` only).
        group_index: (N,) long prompt-group ids.
        all_wrong: enable rule 1.
        tpf_range_threshold: rule 2 threshold (config 0.01); ``None`` disables it.
        zero_std: enable rule 3.

    Returns:
        The kept group ids and per-rule drop counts.
    """
    inverse, g = check_grouped(group_index, correct=correct, tpf=tpf, rewards_total=rewards_total)
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    if tpf_range_threshold is not None and not tpf_range_threshold >= 0:
        raise ValueError(f"tpf_range_threshold must be >= 0 or None, got {tpf_range_threshold}")
    ids = torch.unique(group_index)
    masks = {"all_wrong": None, "tpf_range": None, "zero_std": None}  # (g,) bool per enabled rule, in order
    if all_wrong:
        masks["all_wrong"] = group_reduce(correct.double(), inverse, g, "amax") == 0
    if tpf_range_threshold is not None:
        span = group_reduce(tpf, inverse, g, "amax") - group_reduce(tpf, inverse, g, "amin")
        masks["tpf_range"] = span < tpf_range_threshold
    if zero_std:
        _, std = group_mean_std(rewards_total, inverse, g, unbiased=False)
        masks["zero_std"] = group_reduce(std, inverse, g, "amax") <= FLAT_TOL
    drop = torch.zeros(g, dtype=torch.bool, device=inverse.device)
    counts = {}
    for name, mask in masks.items():
        new = mask & ~drop if mask is not None else torch.zeros_like(drop)
        counts[name] = int(new.sum())
        drop |= new
    keep = ~drop
    return FilterResult(
        kept=ids[keep].long(), keep_rows=keep[inverse], num_groups=g,
        dropped_all_wrong=counts["all_wrong"], dropped_tpf_range=counts["tpf_range"],
        dropped_zero_std=counts["zero_std"],
    )

