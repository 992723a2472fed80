"""Per-group reward shaping: accuracy and speed (TPF) terms, normalised within each prompt group (spec §3.3).

All functions are pure: 1-D tensors of N responses in, new tensors out. ``group_index`` (N,) long gives each
response's prompt group; ids need not be contiguous or sorted. Statistics are computed in float64 (so a flat group
normalises to exactly 0 instead of rounding noise divided by a tiny std) and returned as float32.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

NormMode = Literal["none", "z_score", "minmax"]
AccMode = Literal["pm1", "z_score", "raw"]

FLAT_TOL = 1e-6  # a group whose std (z_score) or range (minmax) is at most this is treated as flat


def check_grouped(group_index: Tensor, n: int | None = None, **values: Tensor) -> tuple[Tensor, int]:
    """Validate ``group_index`` and same-length 1-D ``values``; return compact group ids (N,) and the group count.

    Raises:
        ValueError: naming the offending argument (wrong dtype, shape, length, negative ids or non-finite values).
    """
    if not isinstance(group_index, Tensor) or group_index.dim() != 1:
        raise ValueError(f"group_index must be a 1-D tensor, got {getattr(group_index, 'shape', type(group_index))}")
    if group_index.dtype.is_floating_point or group_index.dtype == torch.bool or group_index.is_complex():
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")
    if group_index.numel() and int(group_index.min()) < 0:
        raise ValueError("group_index must be >= 0")
    n = group_index.numel() if n is None else n
    if group_index.numel() != n:
        raise ValueError(f"group_index has {group_index.numel()} entries, expected {n}")
    for name, v in values.items():
        if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != n:
            raise ValueError(f"{name} must be a 1-D tensor of length {n} (as group_index), got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
        if v.dtype != torch.bool and not bool(torch.isfinite(v.double()).all()):
            raise ValueError(f"{name} contains NaN or inf")
    groups, inverse = torch.unique(group_index, return_inverse=True)
    return inverse, int(groups.numel())


def group_reduce(values: Tensor, inverse: Tensor, num_groups: int, op: str) -> Tensor:
    """Per-group ``sum``/``mean``/``amin``/``amax`` of float64 ``values`` (N,) → (num_groups,)."""
    out = torch.zeros(num_groups, dtype=torch.float64, device=values.device)
    return out.scatter_reduce(0, inverse, values.double(), reduce=op, include_self=False)


def group_mean_std(values: Tensor, inverse: Tensor, num_groups: int, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Per-response group mean and std (N,), float64. A group of one has std 0 (also when ``unbiased``)."""
    v = values.double()
    count = torch.bincount(inverse, minlength=num_groups).double()
    mean = group_reduce(v, inverse, num_groups, "sum") / count
    dev2 = group_reduce((v - mean[inverse]) ** 2, inverse, num_groups, "sum")
    denom = (count - 1).clamp(min=1) if unbiased else count
    std = torch.where(count > 1, (dev2 / denom).sqrt(), torch.zeros_like(dev2))
    return mean[inverse], std[inverse]


def group_normalize(
    values: Tensor, group_index: Tensor, mode: NormMode = "z_score", coefficient: float = 1.0
) -> Tensor:
    """Normalise ``values`` within each group, then scale by ``coefficient`` (spec §3.3, speed term).

    * ``none``: ``coefficient · v``.
    * ``z_score``: ``coefficient · (v − mean_G) / std_G`` with the population std; 0 for a flat group
      (std ≤ 1e-6). The released math code ignores the coefficient here; set it to 1.0 to match.
    * ``minmax``: ``coefficient · (v − min_G) / (max_G − min_G)``; ``coefficient · 0.5`` for a flat group.

    Args:
        values: (N,) float or bool.
        group_index: (N,) long prompt-group id of each response.
        mode: ``"none"``, ``"z_score"`` or ``"minmax"``.
        coefficient: Multiplies the result in every mode.

    Returns:
        (N,) float32.
    """
    inverse, g = check_grouped(group_index, values=values)
    if mode not in ("none", "z_score", "minmax"):
        raise ValueError(f"mode must be 'none', 'z_score' or 'minmax', got {mode!r}")
    if not math.isfinite(float(coefficient)):
        raise ValueError(f"coefficient must be finite, got {coefficient}")
    v = values.double()
    if mode == "none":
        out = v
    elif mode == "z_score":
        mean, std = group_mean_std(v, inverse, g, unbiased=False)
        out = torch.where(std > FLAT_TOL, (v - mean) / std.clamp(min=FLAT_TOL), torch.zeros_like(v))
    else:
        lo = group_reduce(v, inverse, g, "amin")[inverse]
        hi = group_reduce(v, inverse, g, "amax")[inverse]
        span = hi - lo
        out = torch.where(span > FLAT_TOL, (v - lo) / span.clamp(min=FLAT_TOL), torch.full_like(v, 0.5))
    return (coefficient * out).float()


def accuracy_reward(accuracy: Tensor, group_index: Tensor, mode: AccMode = "pm1") -> Tensor:
    """Accuracy term of the reward (spec §3.3).

    * ``pm1`` (paper): ``2a − 1``: correct → +1, wrong → −1; a code pass rate p ∈ [0, 1] maps to 2p − 1.
    * ``z_score`` (released config): the accuracy z-scored within its group (population std, 0 when flat).
    * ``raw``: the accuracy itself (0/1 or pass rate; the released code's ``acc_norm=False`` for code).

    Args:
        accuracy: (N,) bool, or float in [0, 1].
        group_index: (N,) long.
        mode: ``"pm1"``, ``"z_score"`` or ``"raw"``.

    Returns:
        (N,) float32.
    """
    check_grouped(group_index, accuracy=accuracy)
    a = accuracy.double()
    if a.numel() and (float(a.min()) < 0 or float(a.max()) > 1):
        raise ValueError("accuracy must lie in [0, 1]")
    if mode == "pm1":
        return (2 * a - 1).float()
    if mode == "z_score":
        return group_normalize(a, group_index, "z_score")
    if mode == "raw":
        return a.float()
    raise ValueError(f"mode must be 'pm1', 'z_score' or 'raw', got {mode!r}")


def apply_length_penalty(correct: Tensor, truncated: Tensor, enabled: bool = True) -> Tensor:
    """Count responses that hit the generation budget as wrong (spec §3.3, math: over-length ⇒ wrong).

    Args:
        correct: (N,) bool (returned as bool) or float pass rates (truncated rows become 0).
        truncated: (N,) bool, True where the response stopped at ``max_new_tokens``.
        enabled: ``False`` returns ``correct`` unchanged (the released code applies it to math only).

    Returns:
        (N,) tensor of ``correct``'s dtype.
    """
    if not isinstance(correct, Tensor) or not isinstance(truncated, Tensor) or correct.shape != truncated.shape \
            or correct.dim() != 1:
        raise ValueError(f"correct and truncated must be 1-D tensors of the same length, got "
                         f"{getattr(correct, 'shape', None)} and {getattr(truncated, 'shape', None)}")
    if truncated.dtype != torch.bool:
        raise ValueError(f"truncated must be a bool tensor, got {truncated.dtype}")
    if not enabled:
        return correct.clone()
    if correct.dtype == torch.bool:
        return correct & ~truncated
    return torch.where(truncated, torch.zeros_like(correct), correct)
