"""Step log-probabilities of recorded dUltra planner trajectories, recomputed by the training forward (spec §8.3).

For step s of a response (one block, masked set M_s, decisions u_s):

    log π(step s) = log P_rule(u_s | p(x_s))  +  Σ_{i: u_i = 1, i in the response} log p_θ(x_i | x_s)

where P_rule is the planner's decision rule (independent Bernoulli(p_i) with the at-least-one rule, see
`lrl.rollout.unmasking.planner_logprob`: the spec's Σ u log p + (1 − u) log(1 − p), made exact for the one
outcome the rule also reaches from an empty draw) and the token term scores tokens under the rollout's processed
distribution (temperature, top-k/top-p), as `lrl.algorithms.logprobs` does.

The trajectory is read from the step maps: at step s of a block, M_s = {i in the block : step_i >= s} and
u_i = [step_i == s]. Rows are packed exactly like the ``trajectory`` estimator (`pack_samples`: the r-th step of
every block shares one noisy copy), so a response costs ceil(rounds / max_copies) forwards. Positions after a
mid-block stop (``tail_ids``) take part in the decisions (the planner decided them) but their tokens are not
scored, as in the token estimator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lrl.algorithms.logprobs import pack_samples, sampling_support
from lrl.algorithms.token_logprobs import token_logprobs
from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.planner import planner_confidence
from lrl.rollout.unmasking import planner_logprob

_CONF_CHUNK = 256  # rows of (rows × vocabulary) logits live at once for the confidence feature


def planner_step_logprobs(
    lm: BlockDiffusionLM,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    step_maps: list[list[int]],
    *,
    block_size: int,
    pad_id: int = 0,
    max_copies: int = 8,
    rows_per_forward: int = 8,
    tail_ids: list[list[int]] | None = None,
    tail_step_maps: list[list[int]] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per-step decision and token log-probs of planner trajectories (grad flows if enabled by the caller).

    Args:
        lm: the policy, with ``lm.planner`` set.
        prompt_ids, response_ids, step_maps, tail_ids, tail_step_maps: per response, as in `RolloutBatch`
            (step ids 1..S_j, every step unmasking at least one position, as the planner strategy guarantees).
        block_size: the rollout block size.
        temperature, top_k, top_p: the rollout's token distribution (greedy rollouts: 1, 0, 1).
        max_copies, rows_per_forward, pad_id: packing knobs, as in `lrl.algorithms.logprobs.response_logprobs`.
    Returns:
        decision (Σ S_j,) and token (Σ S_j,) float32, response-major, entry s − 1 of response j its step s; the step
        log-prob is their sum. And S_j per response (steps of its blocks, tail included).
    """
    if getattr(lm, "planner", None) is None:
        raise ValueError("planner_step_logprobs needs a model with a planner head (lm.planner is None)")
    tails = tail_step_maps if tail_step_maps is not None else [[]] * len(response_ids)
    n_steps = [max(list(sm) + list(t), default=0) for sm, t in zip(step_maps, tails)]
    dev, bs = lm.device, block_size
    offs = torch.tensor([0] + n_steps[:-1], dtype=torch.long).cumsum(0).to(dev)
    support = sampling_support(top_k, top_p)
    decision = torch.zeros(sum(n_steps), device=dev)
    token = torch.zeros(sum(n_steps), device=dev)
    for c in planner_rounds(lm, prompt_ids, response_ids, step_maps, block_size=bs, pad_id=pad_id,
                            max_copies=max_copies, rows_per_forward=rows_per_forward, tail_ids=tail_ids,
                            tail_step_maps=tail_step_maps):
        tb, tk, tl = c.targets.nonzero(as_tuple=True)
        tok = c.input_ids[tb, tl]
        is_target = c.targets[c.order[:, 0], c.order[:, 1], c.order[:, 2]]

        def head(states, out_layer, is_target=is_target, tok=tok):
            z = lm.planner(states, _confidence(states, out_layer))
            lp, _ = token_logprobs(states[is_target], out_layer.weight, tok, bias=out_layer.bias,
                                   temperature=temperature, support=support)
            return z, lp

        z, lp = lm(c.input_ids, c.noisy, c.lengths, block_size=bs, select=c.noisy, head=head)
        rows, k, padded = c.masked.shape
        plan = torch.zeros(rows, k, padded, device=dev, dtype=z.dtype)
        plan[c.order[:, 0], c.order[:, 1], c.order[:, 2]] = z
        dec = planner_logprob(plan.view(-1, bs), c.masked.view(-1, bs), c.chosen.view(-1, bs)).view(rows, k, -1)
        has = c.masked.view(rows, k, -1, bs).any(-1)
        gb, _, _ = has.nonzero(as_tuple=True)
        decision = decision.index_add(0, offs[c.sample[gb]] + c.group_step[has] - 1, dec[has])
        token = token.index_add(0, offs[c.sample[tb]] + c.steps[tb, tl] - 1, lp)
    return decision, token, n_steps


@dataclass
class PlannerRounds:
    """One forward's worth of packed planner rounds (see `planner_rounds`); R rows, K copies, L' = L padded to
    whole blocks.

    input_ids (R, L), lengths (R,), noisy (R, K, L): as `PackedRows`; sample (R,) response index;
    masked (R, K, L') bool = noisy padded; chosen (R, K, L') bool, the decisions u of each copy's blocks;
    targets (R, K, L) bool, chosen positions inside the response (their tokens are scored);
    group_step (R, K, L'/bs) long, the step id of each (copy, block) (huge where nothing is masked);
    steps (R, L') long, the step id of every position (0: prompt or padding);
    order (M, 3) the (row, copy, position) of each state returned by ``lm.diffusion_states(..., select=noisy)``.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    noisy: torch.Tensor
    sample: torch.Tensor
    masked: torch.Tensor
    chosen: torch.Tensor
    targets: torch.Tensor
    group_step: torch.Tensor
    steps: torch.Tensor
    order: torch.Tensor


def planner_rounds(
    lm: BlockDiffusionLM,
    prompt_ids,
    response_ids,
    step_maps,
    *,
    block_size: int,
    pad_id: int = 0,
    max_copies: int = 8,
    rows_per_forward: int = 8,
    tail_ids=None,
    tail_step_maps=None,
) -> Iterator[PlannerRounds]:
    """The packed rounds of planner trajectories, ``rows_per_forward`` rows at a time (module docstring)."""
    n = len(response_ids)
    tails = tail_step_maps if tail_step_maps is not None else [[]] * n
    # the tail joins the response here: a step that decided only tail positions is a round of its own (the token
    # estimator skips it, having nothing to score); tail tokens are dropped from the targets below
    tail_tok = tail_ids if tail_ids is not None else [[]] * n
    packed = pack_samples(prompt_ids, [list(r) + list(t) for r, t in zip(response_ids, tail_tok)],
                          [list(sm) + list(t) for sm, t in zip(step_maps, tails)], estimator="trajectory",
                          block_size=block_size, pad_id=pad_id, max_copies=max_copies, device=lm.device)
    dev, bs = lm.device, block_size
    b, k, length = packed.noisy.shape
    padded = -(-length // bs) * bs
    # step id of every position of every packed row (0: prompt or padding), and where its response ends
    steps = torch.zeros(b, padded, dtype=torch.long)
    ends = torch.zeros(b, dtype=torch.long)
    for i, j in enumerate(packed.sample.tolist()):
        p = len(prompt_ids[j])
        sm = list(step_maps[j]) + list(tails[j])
        steps[i, p : p + len(sm)] = torch.tensor(sm, dtype=torch.long)
        ends[i] = p + len(response_ids[j])
    steps, ends = steps.to(dev), ends.to(dev)
    in_response = torch.arange(length, device=dev)[None] < ends[:, None]  # (B, L)
    big = torch.iinfo(torch.long).max
    for s in range(0, b, rows_per_forward):
        sl = slice(s, s + rows_per_forward)
        noisy = packed.noisy[sl]
        rows = noisy.shape[0]
        masked = torch.zeros(rows, k, padded, dtype=torch.bool, device=dev)
        masked[..., :length] = noisy
        row_steps = steps[sl][:, None].expand(-1, k, -1)
        # the step of each (copy, block): the smallest step still masked there; its decisions u = [step == it]
        group_step = torch.where(masked, row_steps, big).view(rows, k, -1, bs).amin(-1)
        chosen = masked & (row_steps == group_step.repeat_interleave(bs, -1))
        yield PlannerRounds(
            input_ids=packed.input_ids[sl], lengths=packed.lengths[sl], noisy=noisy, sample=packed.sample[sl],
            masked=masked, chosen=chosen, targets=packed.targets[sl] & in_response[sl][:, None],
            group_step=group_step, steps=steps[sl], order=noisy.nonzero(as_tuple=False),
        )


def _confidence(states: torch.Tensor, out_layer) -> torch.Tensor:
    """The planner's confidence feature of each state, (M,), chunked over rows (no (M × V) logits kept)."""
    with torch.no_grad():
        return torch.cat([planner_confidence(out_layer(states[c : c + _CONF_CHUNK]))
                          for c in range(0, states.shape[0], _CONF_CHUNK)])
