"""dUltra's step-count reward (spec §8.3): fewer denoising forwards per response is better.

Pure function on 1-D tensors of N responses, with the same decoupled per-group normalisation as the LightningRL
speed term (`lrl.algorithms.reward_shaping.group_normalize`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lrl.algorithms.reward_shaping import NormMode, group_normalize

StepPenalty = Literal["linear", "sqrt"]


def step_count_raw(num_forwards: Tensor, *, kind: StepPenalty = "linear", scale: float = 50.0) -> Tensor:
    """(N,) float64 −forwards / scale (``linear``, dUltra's −#steps/50) or −√forwards / scale (``sqrt``).

    Args:
        num_forwards: (N,) denoising forwards (non-empty steps) per response (`RolloutBatch.num_forwards`).
        kind, scale: the penalty's shape and divisor (> 0).
    """
    if kind not in ("linear", "sqrt"):
        raise ValueError(f"step penalty kind must be 'linear' or 'sqrt', got {kind!r}")
    if not scale > 0:
        raise ValueError(f"step penalty scale must be > 0, got {scale}")
    f = num_forwards.double()
    if f.numel() and float(f.min()) < 0:
        raise ValueError("num_forwards must be >= 0")
    return -(f if kind == "linear" else f.sqrt()) / scale


def step_count_reward(
    num_forwards: Tensor,
    group_index: Tensor,
    *,
    kind: StepPenalty = "linear",
    scale: float = 50.0,
    mode: NormMode = "none",
    coefficient: float = 1.0,
) -> Tensor:
    """`step_count_raw`, normalised per group with ``mode`` and multiplied by ``coefficient`` (N,) float32.

    Args:
        num_forwards: (N,) denoising forwards per response.
        group_index: (N,) long prompt-group ids.
        kind, scale: as in `step_count_raw`.
        mode, coefficient: as in `group_normalize` (``none``: the raw penalty times ``coefficient``).
    """
    return group_normalize(step_count_raw(num_forwards, kind=kind, scale=scale), group_index, mode, coefficient)
