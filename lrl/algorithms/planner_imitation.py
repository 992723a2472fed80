"""dUltra's imitation stage: teach the planner head to reproduce confidence-threshold unmasking (spec §8.3).

Teacher data are the base model's own greedy ``low_confidence_dynamic`` rollouts at threshold φ. Every step of
every block gives one example per masked position: the final state predicting it, its confidence feature, and the
label u_i = [the teacher unmasked i at this step]. The teacher's rule is "confidence >= φ, plus the most
confident position"; the planner's greedy rule is "p >= 0.5, plus the largest p" (`planner_decisions`). So the
loss has two parts:

* BCE of p_i against u_i (the threshold part). Where the teacher unmasked exactly one position the label is
  ambiguous (threshold or forced argmax), so that one position is left out; its masked neighbours keep label 0.
* Cross-entropy of softmax over the step's masked positions of the planner logits, targeting the teacher's
  unmasked position of highest confidence (the argmax part: the planner's fallback must pick the same position).

The backbone is frozen here: the states are computed once (no grad), then only the head is fitted (Adam).
Before fitting, the head's confidence standardisation is set from the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrl.algorithms.planner_logprobs import _confidence, planner_rounds
from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.planner import PlannerHead
from lrl.rollout.types import RolloutBatch


@torch.no_grad()
def imitation_examples(lm: BlockDiffusionLM, batch: RolloutBatch, *, block_size: int, pad_id: int = 0,
                       max_copies: int = 8, rows_per_forward: int = 8):
    """The examples of `fit_imitation`, one per masked position of every recorded step.

    ``batch``: greedy teacher rollouts (the decisions are read from its step maps).
    Returns:
        states (M, H), confidence (M,), label (M,) float, weight (M,) float (0: left out of the BCE), slot (M,)
        long: the example's cell in the flattened (G, block_size) grid of the G steps, and target (G,) long: the
        column of each step's argmax target in that grid.
    """
    states, conf, labels, weights, slots, targets = [], [], [], [], [], []
    groups = 0
    for c in planner_rounds(lm, batch.prompt_ids, batch.response_ids, batch.step_maps, block_size=block_size,
                            pad_id=pad_id, max_copies=max_copies, rows_per_forward=rows_per_forward,
                            tail_ids=batch.tail_ids, tail_step_maps=batch.tail_step_maps):
        h = lm.diffusion_states(c.input_ids, c.noisy, c.lengths, block_size)
        rows, k, padded = c.masked.shape
        per_group = c.chosen.view(rows, k, -1, block_size).sum(-1).repeat_interleave(block_size, -1)
        r, kk, pos = c.order.unbind(-1)
        chosen = c.chosen[r, kk, pos]
        cf = _confidence(h, lm.model.get_output_embeddings())
        states.append(h)
        conf.append(cf)
        labels.append(chosen.float())
        weights.append((~(chosen & (per_group[r, kk, pos] == 1))).float())
        # dense (groups, block) grid of this chunk's steps: the argmax target is the most confident chosen cell
        has = c.masked.view(rows, k, -1, block_size).any(-1)
        gid = torch.full(has.shape, -1, dtype=torch.long, device=has.device)
        gid[has] = torch.arange(int(has.sum()), device=has.device)
        cell = gid[r, kk, pos // block_size] * block_size + pos % block_size
        grid = torch.full((int(has.sum()) * block_size,), float("-inf"), device=cf.device)
        grid[cell] = torch.where(chosen, cf.float(), float("-inf"))
        targets.append(grid.view(-1, block_size).argmax(-1))
        slots.append(cell + groups * block_size)
        groups += int(has.sum())
    return (torch.cat(states), torch.cat(conf), torch.cat(labels), torch.cat(weights), torch.cat(slots),
            torch.cat(targets))


def fit_imitation(head: PlannerHead, states: torch.Tensor, conf: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor, slots: torch.Tensor, targets: torch.Tensor, *, block_size: int,
                  steps: int = 400, lr: float = 0.05, train_mlp: bool = False) -> list[float]:
    """Fit ``head`` to `imitation_examples` (weighted BCE + per-step argmax cross-entropy, full batch, Adam);
    returns the loss of every step.

    By default only the threshold part is fitted, p = sigmoid(conf_skip · feature + bias): the teacher's rule is
    a function of the confidence alone, and fitting the MLP on a few hundred states memorises them (held-out
    agreement drops); the MLP stays at its zero output for RL to use. ``train_mlp`` (forced for heads without
    the confidence feature) fits every parameter.

    The head's confidence standardisation (``conf_shift`` / ``conf_scale``) is first set to the mean and inverse
    std of the examples' log-confidence.
    """
    if steps < 1:
        raise ValueError(f"imitation steps must be >= 1, got {steps}")
    if not bool((weights > 0).any()):
        raise ValueError("imitation: no usable examples (every step unmasked a single position)")
    with torch.no_grad():
        logc = conf.float().clamp_min(1e-12).log()
        head.conf_shift.fill_(logc.mean())
        head.conf_scale.fill_(1.0 / logc.std().clamp_min(1e-6) if logc.numel() > 1 else 1.0)
    params = list(head.parameters())
    if not train_mlp and head.conf_skip is not None:
        params = [head.conf_skip, head.fc2.bias]
    opt = torch.optim.Adam(params, lr=lr)
    x, c = states.detach(), conf.detach()
    losses = []
    n_groups = targets.numel()
    for _ in range(steps):
        z = head(x, c)
        bce = (F.binary_cross_entropy_with_logits(z, labels, reduction="none") * weights).sum() / weights.sum()
        grid = torch.full((n_groups * block_size,), float("-inf"), device=z.device).index_put((slots,), z)
        ce = F.cross_entropy(grid.view(n_groups, block_size), targets)
        loss = bce + ce
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def step_agreement(lm: BlockDiffusionLM, batch: RolloutBatch, *, block_size: int, threshold: float = 0.5,
                   pad_id: int = 0) -> float:
    """Teacher-forced agreement: the fraction of the recorded steps of ``batch`` at which the planner's greedy
    decisions (`planner_decisions` on the recorded state) are exactly the recorded ones."""
    from lrl.rollout.unmasking import planner_decisions

    same = total = 0
    for c in planner_rounds(lm, batch.prompt_ids, batch.response_ids, batch.step_maps, block_size=block_size,
                            pad_id=pad_id, tail_ids=batch.tail_ids, tail_step_maps=batch.tail_step_maps):
        rows, k, _ = c.masked.shape
        h = lm.diffusion_states(c.input_ids, c.noisy, c.lengths, block_size)
        z = lm.planner(h, _confidence(h, lm.model.get_output_embeddings()))
        plan = torch.zeros(c.masked.shape, device=z.device)
        plan[c.order[:, 0], c.order[:, 1], c.order[:, 2]] = z
        has = c.masked.view(rows, k, -1, block_size).any(-1)
        got = planner_decisions(plan.view(-1, block_size), c.masked.view(-1, block_size), greedy=True,
                                threshold=threshold).view(rows, k, -1, block_size)
        want = c.chosen.view(rows, k, -1, block_size)
        same += int(((got == want).all(-1) & has).sum())
        total += int(has.sum())
    return same / total if total else 1.0


def decision_agreement(a: RolloutBatch, b: RolloutBatch) -> float:
    """Fraction of generated positions (over the shorter of each response pair) where two rollouts of the same
    prompts put the same token at the same step: 1.0 means identical decoding trajectories."""
    if len(a) != len(b):
        raise ValueError(f"decision_agreement: {len(a)} vs {len(b)} responses")
    same = total = 0
    for ia, sa, ib, sb in zip(a.response_ids, a.step_maps, b.response_ids, b.step_maps):
        n = min(len(ia), len(ib))
        same += sum(1 for i in range(n) if ia[i] == ib[i] and sa[i] == sb[i])
        total += max(len(ia), len(ib))
    return same / total if total else 1.0
