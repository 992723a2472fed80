"""Train–rollout agreement of the sampled tokens' log-probs: truncated importance weights and the logged
mismatch metrics (README, "Rollout and training see the same distribution")."""

from __future__ import annotations

import torch


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """(T,) truncated importance weights min(π_old/π_rollout, cap), detached (verl's TIS)."""
    return torch.exp(old_logp.detach().float() - rollout_logp.float()).clamp(max=cap)


def mismatch_metrics(pairs: list[tuple[torch.Tensor, torch.Tensor]], tis_cap: float | None) -> dict[str, float]:
    """Train–rollout agreement of one step's tokens: ``rollout/logprob_abs_diff/{mean,max}``, ``rollout/logprob_corr``
    (Pearson, over tokens; left out when either side is constant) and, with TIS, ``rollout/tis_clip_frac``."""
    if not pairs:
        return {}
    old = torch.cat([p[0] for p in pairs]).double()
    roll = torch.cat([p[1] for p in pairs]).double()
    if not old.numel():
        return {}
    diff = (old - roll).abs()
    out = {"rollout/logprob_abs_diff/mean": float(diff.mean()), "rollout/logprob_abs_diff/max": float(diff.max())}
    if old.numel() > 1 and float(old.std()) > 0 and float(roll.std()) > 0:
        out["rollout/logprob_corr"] = float(torch.corrcoef(torch.stack([old, roll]))[0, 1])
    if tis_cap is not None:
        out["rollout/tis_clip_frac"] = float((torch.exp(old - roll) > tis_cap).double().mean())
    return out
