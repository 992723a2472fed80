"""torchmetrics metrics of evaluation and training logs: response accuracy and tokens per forward (spec §6.2)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _as_1d(name: str, value) -> Tensor:
    t = torch.as_tensor(value)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {tuple(t.shape)}")
    t = t.reshape(-1).double()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


class ResponseAccuracy(Metric):
    """Mean correctness over responses: bools, or scores in [0, 1] such as code pass rates (spec §6.2).

    ``compute`` is 0.0 before any response was seen.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct) -> None:
        """Add (N,) bool or float in [0, 1]."""
        v = _as_1d("correct", correct)
        if v.numel() and (float(v.min()) < 0 or float(v.max()) > 1):
            raise ValueError("correct must lie in [0, 1]")
        self.total += v.sum().to(self.total.device)
        self.count += v.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class TokensPerForward(Metric):
    """Σ tokens ÷ Σ denoising forwards over all responses: a ratio of sums, as the evaluation reports TPF (§2.5).

    ``compute`` is 0.0 while no forward was counted.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("forwards", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tokens, forwards) -> None:
        """Add per-response token counts and forward counts (scalars or (N,) of equal length, non-negative)."""
        t, f = _as_1d("tokens", tokens), _as_1d("forwards", forwards)
        if t.shape != f.shape:
            raise ValueError(f"tokens and forwards must have the same length, got {t.numel()} and {f.numel()}")
        if t.numel() and (float(t.min()) < 0 or float(f.min()) < 0):
            raise ValueError("tokens and forwards must be >= 0")
        self.tokens += t.sum().to(self.tokens.device)
        self.forwards += f.sum().to(self.forwards.device)

    def compute(self) -> Tensor:
        if float(self.forwards) == 0:
            return torch.tensor(0.0)
        return (self.tokens / self.forwards).float()
