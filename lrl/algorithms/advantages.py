"""Sequence advantages from rewards, and the advantage-collapse diagnostic (spec §3.5).

Pure tensor functions over N kept responses; ``group_index`` (N,) long gives each response's prompt group.
Statistics are computed in float64 and returned as float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lrl.algorithms.reward_shaping import check_grouped, group_mean_std

AdvantageMode = Literal["batch", "prompt_group", "prompt_group_center"]


def compute_advantages(
    rewards: Tensor,
    group_index: Tensor,
    mode: AdvantageMode = "batch",
    eps: float = 1e-8,
    batch_stats: tuple[float, float] | None = None,
) -> Tensor:
    """Advantage of each response (spec §3.5, ``reward.adv_norm_mode``).

    * ``batch`` (default, paper Eq. 7): ``(R − mean_B R) / max(std_B R, eps)``, std = torch's **unbiased** std over
      all N responses (0 when N = 1). Under data parallelism B is the batch of *all* ranks: pass its
      ``batch_stats`` = (mean, unbiased std), e.g. from `global_mean_std`, and the rank's rewards are normalised
      by them instead of by their own.
    * ``prompt_group``: the same statistic within each prompt group; a group of one response gets advantage 0.
    * ``prompt_group_center``: ``R − mean_group R`` (no division).

    Args:
        rewards: (N,) float total reward of each kept response.
        group_index: (N,) long prompt-group ids.
        mode: ``"batch"``, ``"prompt_group"`` or ``"prompt_group_center"``.
        eps: Floor of the std (> 0).
        batch_stats: ``batch`` mode only: (mean, unbiased std) of the whole batch; None = those of ``rewards``.

    Returns:
        (N,) float32 advantages.
    """
    inverse, g = check_grouped(group_index, rewards=rewards)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    r = rewards.double()
    if mode == "batch":
        if r.numel() == 0:
            return r.float()
        if batch_stats is not None:
            mean, std = r.new_tensor(float(batch_stats[0])), r.new_tensor(float(batch_stats[1]))
        else:
            mean = r.mean()
            std = r.std(unbiased=True) if r.numel() > 1 else r.new_zeros(())
        return ((r - mean) / std.clamp(min=eps)).float()
    if mode == "prompt_group":
        mean, std = group_mean_std(r, inverse, g, unbiased=True)
        return ((r - mean) / std.clamp(min=eps)).float()
    if mode == "prompt_group_center":
        mean, _ = group_mean_std(r, inverse, g, unbiased=False)
        return (r - mean).float()
    raise ValueError(f"mode must be 'batch', 'prompt_group' or 'prompt_group_center', got {mode!r}")


def global_mean_std(columns: Sequence[Tensor]) -> list[tuple[int, float, float, float]]:
    """Count, mean, unbiased and population std of each 1-D tensor in ``columns`` over the responses of **all**
    ranks (spec §3.5, paper Eq. 7 under DDP/FSDP), or of this process when `torch.distributed` is not initialised.

    Every rank must call it with the same number of columns (a rank with no responses passes empty tensors). Two
    all-reduces in float64 (sums and counts, then squared deviations from the global mean), so the result equals
    the single-process statistic of the concatenated responses up to summation order.

    Returns:
        ``[(n, mean, std_unbiased, std_population), ...]``, one per column; mean/std are 0 when n = 0 and the
        stds 0 when n = 1 (as `compute_advantages`).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    device = torch.device("cpu")
    if distributed and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    cols = [c.detach().double().flatten().to(device) for c in columns]
    sums = torch.stack([torch.stack([c.new_tensor(float(c.numel())), c.sum()]) for c in cols]) if cols else \
        torch.zeros(0, 2, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(sums)
    n = sums[:, 0]
    mean = torch.where(n > 0, sums[:, 1] / n.clamp(min=1), torch.zeros_like(n))
    dev2 = torch.stack([((c - m) ** 2).sum() for c, m in zip(cols, mean)]) if cols else torch.zeros_like(n)
    if distributed:
        dist.all_reduce(dev2)
    unbiased = torch.where(n > 1, (dev2 / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    population = torch.where(n > 1, (dev2 / n.clamp(min=1)).sqrt(), torch.zeros_like(n))
    return [(int(a), float(b), float(c), float(d)) for a, b, c, d in
            zip(n.tolist(), mean.tolist(), unbiased.tolist(), population.tolist())]


def collapse_ratio(
    advantages: Tensor, group_index: Tensor, taus: Sequence[float] = (0.01, 0.05, 0.1, 0.5)
) -> dict[float, float]:
    """Fraction of within-group response pairs whose advantages differ by less than τ (spec §3.5).

    The paper's definition: unordered pairs (i, j), i ≠ j, of responses to the same prompt, pooled over all groups
    (not the released code's token-level matrix over the whole batch). High values mean the advantage no longer
    separates a group's responses. With no pair at all (every group has one response) every ratio is 0.0.

    Args:
        advantages: (N,) float sequence advantages.
        group_index: (N,) long prompt-group ids.
        taus: Thresholds τ (> 0).

    Returns:
        ``{τ: fraction}`` in the order of ``taus``.
    """
    inverse, g = check_grouped(group_index, advantages=advantages)
    if any(not t > 0 for t in taus):
        raise ValueError(f"taus must be > 0, got {tuple(taus)}")
    a = advantages.double()
    diffs = []
    for k in range(g):
        members = a[inverse == k]
        if members.numel() > 1:
            i, j = torch.triu_indices(members.numel(), members.numel(), offset=1)
            diffs.append((members[i] - members[j]).abs())
    if not diffs:
        return {float(t): 0.0 for t in taus}
    d = torch.cat(diffs)
    return {float(t): float((d < t).double().mean()) for t in taus}
