"""dUltra's policy objectives over planner trajectories, as pure tensor functions (spec §8.3).

Two ways to put a planner step into PPO/GRPO (``model.planner_ratio``):

* ``separate`` (`planner_policy_loss`): the tokens keep LightningRL's per-token loss and the decisions get their
  own PPO-clip term with one ratio per step, added to it;
* ``joint`` (`joint_step_loss`): one ratio per step whose log-probability is the spec's
  log π(step s) = Σ_{i ∈ M_s} log P(u_i) + Σ_{i: u_i = 1} log p_θ(x_i | x_s), i.e. the step is the unit of the
  LightningRL loss (`lrl.algorithms.losses.lightningrl_loss`: the same clip, KL estimators and reductions, with
  "token" read as "step").
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lrl.algorithms.losses import LossConfig, LossNormalizer, LossOutput, lightningrl_loss, reduce


def planner_policy_loss(
    new: Tensor,
    old: Tensor,
    advantages: Tensor,
    steps_per_response: list[int],
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    num_responses: int | None = None,
) -> Tensor:
    """PPO-clip surrogate of the planner's decisions, one unit per denoising step (spec §8.3, ``separate``).

    L = (1 / N) Σ_j (1 / S_j) Σ_s −min(r_js A_j, clip(r_js, 1 − ε_low, 1 + ε_high) A_j), r_js = exp(new − old).

    Args:
        new, old: (Σ S_j,) decision log-probs of each step (`planner_step_logprobs`'s first output; old detached:
            the rollout's, e.g. ``RolloutBatch.planner_logprobs``), response-major.
        advantages: (J,) one advantage per response.
        steps_per_response: S_j per response (responses with S_j = 0 contribute nothing).
        num_responses: N of the sequence mean (the whole minibatch's, so micro-batches add up); default J.
    Returns:
        scalar loss.
    """
    counts = torch.tensor(steps_per_response, dtype=torch.long, device=new.device)
    if new.shape != old.shape or int(counts.sum()) != new.numel() or advantages.numel() != counts.numel():
        raise ValueError(f"planner_policy_loss: {new.numel()} new / {old.numel()} old log-probs, "
                         f"{int(counts.sum())} steps, {advantages.numel()} advantages do not line up")
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=new.device), counts)
    adv = advantages.to(new.device, torch.float32)[seq]
    ratio = torch.exp(new - old.detach())
    surr = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    per_seq = torch.zeros(counts.numel(), device=new.device, dtype=surr.dtype).index_add(0, seq, surr)
    n = num_responses if num_responses is not None else counts.numel()
    return (per_seq / counts.clamp(min=1)).sum() / max(n, 1)


def joint_step_loss(
    decision_logp: Tensor,
    token_logp: Tensor,
    old_step_logp: Tensor,
    advantages: Tensor,
    seq_index: Tensor,
    norm: LossNormalizer,
    config: LossConfig = LossConfig(),
    *,
    ref_step_logp: Tensor | None = None,
    correct_steps: Tensor | None = None,
) -> LossOutput:
    """One micro-batch's share of the joint dUltra loss: one PPO ratio per step (spec §8.3, ``joint``).

    With ℓ_s = decision_logp_s + token_logp_s (the step's log-probability) and ρ_s = exp(ℓ_s − ℓ_s^old):
    L = −reduce(min(ρ A, clip(ρ) A)) + β·reduce(KL(ℓ_s, ℓ_s^ref)) + μ·reduce(−token_logp_s over correct responses),
    each reduction over steps exactly as `lightningrl_loss` reduces over tokens ("token": Σ / steps in the
    minibatch; "sequence": mean over responses of their step means). The NLL term is the tokens' part only (the
    decisions are no language-model likelihood), normalised by the correct responses' steps.

    Args:
        decision_logp: (U,) decision log-probs of the micro-batch's steps (differentiable), response-major.
        token_logp: (U,) Σ of the token log-probs unmasked at each step (differentiable).
        old_step_logp: (U,) the rollout policy's ℓ_s (detached).
        advantages: (U,) each step's response advantage.
        seq_index: (U,) long, minibatch index of each step's response (into ``norm.seq_num_tokens``).
        norm: `build_normalizer` over steps (``seq_num_tokens`` = steps per response), all-reduced by the caller.
        config: the loss knobs (`LossConfig`), as in `lightningrl_loss`; its ``tis_cap`` is not supported here.
        ref_step_logp: (U,) the reference's ℓ_s; required when ``config.kl_beta > 0``.
        correct_steps: (U,) bool, the step's response is correct; required when ``config.nll_weight > 0``.
    Returns:
        `LossOutput`; its stats count steps where `lightningrl_loss` counts tokens.
    """
    if decision_logp.shape != token_logp.shape:
        raise ValueError(f"joint_step_loss: decision_logp {tuple(decision_logp.shape)} and token_logp "
                         f"{tuple(token_logp.shape)} must both be (U,) over the same steps")
    step = decision_logp + token_logp
    # the tokens' NLL only (the decisions are no language-model likelihood): added below, not by lightningrl_loss
    out = lightningrl_loss(step, old_step_logp, advantages, seq_index, norm, replace(config, nll_weight=0.0),
                           ref_logp=ref_step_logp)
    if config.nll_weight <= 0:
        return out
    if correct_steps is None or correct_steps.shape != step.shape:
        raise ValueError(f"joint_step_loss: nll_weight={config.nll_weight} > 0 needs correct_steps of shape "
                         f"{tuple(step.shape)}")
    correct = correct_steps.to(device=step.device, dtype=torch.bool)
    nll = config.nll_weight * reduce(-token_logp[correct], seq_index[correct], config.nll_reduction,
                                     norm.for_correct())
    loss = out.loss + nll
    stats = replace(out.stats, nll=nll.detach().double(),
                    nonfinite=torch.maximum(out.stats.nonfinite, (~torch.isfinite(loss.detach())).double()))
    return LossOutput(loss=loss, stats=stats)
