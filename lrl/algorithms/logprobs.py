"""Response log-probabilities of a block-diffusion policy: the trajectory and single-pass estimators (spec §4.2).

Both return one log-prob per response token, flat, in response-major / position-minor order, so old, new and
reference log-probs of the same samples line up element by element.

* ``trajectory`` (paper Eq. 3/8/9, TraceRL packing): the sampled trajectory is replayed from the step map. For
  block b with distinct step ids s_1 < s_2 < …, round r masks the response positions of b whose step is ≥ s_r
  (not yet unmasked at that step) and targets those whose step == s_r. All blocks' r-th rounds share one noisy
  copy (blocks only see clean earlier blocks, so they do not interfere), and the rounds of a response are packed
  as several noisy copies beside one clean copy, so a response costs ceil(rounds / max_copies) forwards rather
  than one per step. The attention block size must equal the rollout block size.
* ``single_pass`` (released code): every response token masked at once in one noisy copy, with the model's
  configured block size (4 for unmodified SDAR configs).
* ``masked_states`` (issue #12's combination): the trajectory's rounds, but round r scores every response
  position of the block that is still masked (step ≥ s_r), not only those unmasked at s_r; a token's log-prob is
  the mean over the states of its block in which it was masked: from the block's first state (all masked, the
  single-pass state, where the parallelism of the block is decided) to the state that unmasked it (the
  trajectory's). Same forwards as ``trajectory``, more scored targets. Its old log-probs are not the engine's
  sampling log-probs (those are the last state's alone), so ``rollout/logprob_abs_diff`` compares like with like
  only under ``trajectory``.

Same distribution as the rollout: tokens are scored under the rollout's processed distribution (logits /
temperature in `token_logprobs`, restricted to the top-k / top-p support of `sampling_support`, the sampler's
own `support_mask`), so at the rollout weights the old log-probs equal the engine's ``sampling_logprobs``. The
sampled token is always kept in the support: once the policy (or the reference) has moved, a token that left the
top-k/top-p set gets a finite log-prob instead of −inf.

Exact terminal block: a rollout that stopped mid-block (``eos_policy="truncate"``) passes the rest of its final
block as ``tail_ids`` / ``tail_step_maps``. Both estimators put those positions back into the sequence with the
visibility they had during decoding (masked until their step), and never score them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from lrl.algorithms.token_logprobs import token_logprobs
from lrl.models.block_lm import BlockDiffusionLM
from lrl.rollout.unmasking import support_mask

Estimator = Literal["trajectory", "single_pass", "masked_states"]


@dataclass
class PackedRows:
    """Training rows for one forward: clean ids, noisy copies and which masked positions are targets.

    input_ids (B, L) clean prompt+response, right-padded; lengths (B,); noisy (B, K, L) bool masked positions of
    each noisy copy; targets (B, K, L) bool ⊆ noisy, the positions scored in that copy; sample (B,) index of the
    response each row belongs to.
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    noisy: torch.Tensor
    targets: torch.Tensor
    sample: torch.Tensor


def trajectory_rounds(
    prompt_len: int, step_map: list[int], block_size: int, tail_steps: list[int] = (), score_masked: bool = False
) -> list[tuple[list[int], list[int]]]:
    """The denoising rounds of one response as (masked positions, target positions), absolute positions.

    Targets are the positions unmasked at the round's step, or with ``score_masked`` every response position
    still masked in it (the ``masked_states`` estimator).

    Round r packs the r-th step of every block. A step id of 0 (a token never sampled, e.g. a forced token)
    would be treated as known from the start. ``tail_steps``: step ids of the final block's positions after the
    response (truncated at a stop token); they are masked in every round whose step they had not reached yet,
    never targets, and add no round of their own.
    """
    by_block: dict[int, list[tuple[int, int]]] = {}
    for i, s in enumerate(list(step_map) + list(tail_steps)):
        pos = prompt_len + i
        by_block.setdefault(pos // block_size, []).append((pos, s))
    end = prompt_len + len(step_map)
    per_block = {b: sorted({s for p, s in items if s > 0 and p < end}) for b, items in by_block.items()}
    rounds = max((len(v) for v in per_block.values()), default=0)
    out = []
    for r in range(rounds):
        masked, targets = [], []
        for b, items in by_block.items():
            steps = per_block[b]
            if r >= len(steps):
                continue
            s_r = steps[r]
            masked += [p for p, s in items if s >= s_r]
            targets += [p for p, s in items if (s >= s_r if score_masked else s == s_r) and p < end]
        out.append((masked, targets))
    return out


def pack_samples(
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    step_maps: list[list[int]],
    *,
    estimator: Estimator,
    block_size: int,
    pad_id: int,
    max_copies: int = 8,
    device: torch.device | str = "cpu",
    tail_ids: list[list[int]] | None = None,
    tail_step_maps: list[list[int]] | None = None,
) -> PackedRows:
    """Build the training rows of a set of responses for one estimator (see module docstring)."""
    rows = []  # (sample, ids, [(masked, targets), ...])
    n = len(response_ids)
    tails = tail_ids if tail_ids is not None else [[]] * n
    tail_steps = tail_step_maps if tail_step_maps is not None else [[]] * n
    for j, (p, r, sm, t, ts) in enumerate(zip(prompt_ids, response_ids, step_maps, tails, tail_steps)):
        ids = list(p) + list(r) + list(t)
        resp = list(range(len(p), len(p) + len(r)))
        if not resp:
            continue
        if estimator == "single_pass":
            copies = [(list(range(len(p), len(ids))), resp)]
        elif estimator in ("trajectory", "masked_states"):
            copies = trajectory_rounds(len(p), sm, block_size, ts, score_masked=estimator == "masked_states")
        else:
            raise ValueError(f"unknown log-prob estimator {estimator!r} "
                             "(expected 'trajectory', 'single_pass' or 'masked_states')")
        for c in range(0, len(copies), max_copies):
            rows.append((j, ids, copies[c : c + max_copies]))
    if not rows:
        raise ValueError("pack_samples: no response tokens to score")
    # rows of similar shape side by side: a forward pads every row to its longest row and largest copy count
    rows.sort(key=lambda r: (len(r[2]), len(r[1])))
    length = max(len(ids) for _, ids, _ in rows)
    k = max(len(c) for _, _, c in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    noisy = torch.zeros(b, k, length, dtype=torch.bool)
    targets = torch.zeros(b, k, length, dtype=torch.bool)
    for i, (_, ids, copies) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        for c, (m, t) in enumerate(copies):
            noisy[i, c, m] = True
            targets[i, c, t] = True
    return PackedRows(
        input_ids=input_ids.to(device),
        lengths=torch.tensor([len(ids) for _, ids, _ in rows], device=device),
        noisy=noisy.to(device),
        targets=targets.to(device),
        sample=torch.tensor([j for j, _, _ in rows], device=device),
    )


def response_logprobs(
    lm: BlockDiffusionLM,
    prompt_ids,
    response_ids,
    step_maps,
    *,
    estimator: Estimator,
    block_size: int | None = None,
    pad_id: int = 0,
    max_copies: int = 8,
    rows_per_forward: int = 8,
    with_entropy: bool = False,
    sync_forwards: Callable[[int], int] | None = None,
    tail_ids: list[list[int]] | None = None,
    tail_step_maps: list[list[int]] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Log-prob of every response token under ``lm`` (grad flows if enabled by the caller).

    Args:
        lm: the policy or reference model.
        prompt_ids, response_ids, step_maps: per response (as in `RolloutBatch`).
        estimator: ``trajectory``, ``single_pass`` or ``masked_states``.
        block_size: attention block size; the rollout block size must be passed for ``trajectory`` and
            ``masked_states``,
            and the model's configured block size is used for ``single_pass``.
        max_copies: noisy copies packed per row (trajectory rounds per forward).
        rows_per_forward: rows per forward pass (memory knob).
        with_entropy: also return the (detached) entropy of each predicted distribution.
        sync_forwards: maps this rank's number of forward passes to the number to run (FSDP: the maximum over
            ranks, since every forward of a sharded model is a collective); the extra passes rerun the first
            packed row and are added to the result with weight 0, so their backward runs too.
        tail_ids, tail_step_maps: per response, the final block's positions after a mid-block stop and their
            step ids (`RolloutBatch.tail_ids`); replayed, never scored. None: no tails.
        temperature, top_k, top_p: the rollout's sampling distribution (see `sampling_support`); greedy rollouts
            pass 1, 0, 1.
    Returns:
        logp (T,) with T = Σ response lengths, response-major; and entropy (T,) or None.
    """
    if estimator == "single_pass":
        bs = lm.bd.block_size
    else:
        if block_size is None:
            raise ValueError(f"the {estimator} estimator needs block_size = the rollout block size")
        bs = block_size
    packed = pack_samples(
        prompt_ids,
        response_ids,
        step_maps,
        estimator=estimator,
        block_size=bs,
        pad_id=pad_id,
        max_copies=max_copies,
        device=lm.device,
        tail_ids=tail_ids,
        tail_step_maps=tail_step_maps,
    )
    vals, ents, keys = [], [], []
    n = packed.input_ids.shape[0]
    padding = None  # the extra passes' outputs × 0, added to the result so their backward runs too
    if sync_forwards is not None:
        local = -(-n // rows_per_forward)
        for _ in range(sync_forwards(local) - local):
            out = lm(packed.input_ids[:1], packed.noisy[:1], packed.lengths[:1], block_size=bs).sum() * 0.0
            padding = out if padding is None else padding + out
    for s in range(0, n, rows_per_forward):
        sl = slice(s, s + rows_per_forward)
        b_idx, _, l_idx = packed.targets[sl].nonzero(as_tuple=True)
        tok = packed.input_ids[sl][b_idx, l_idx]
        # chunked over targets, recomputed in backward: memory does not grow with targets × vocabulary
        head = partial(_head_logprobs, tokens=tok, temperature=temperature, with_entropy=with_entropy,
                       support=sampling_support(top_k, top_p))
        lp, ent = lm(packed.input_ids[sl], packed.noisy[sl], packed.lengths[sl], block_size=bs,
                     select=packed.targets[sl], head=head)
        vals.append(lp)
        if with_entropy:
            ents.append(ent)
        keys.append(packed.sample[sl][b_idx] * (1 << 32) + l_idx)
    logp, key = torch.cat(vals), torch.cat(keys)
    ent = torch.cat(ents) if with_entropy else None
    if estimator == "masked_states":  # one value per token: the mean over the states it was masked in
        key, inverse = torch.unique(key, return_inverse=True)  # sorted
        count = torch.zeros(key.numel(), device=logp.device).index_add_(0, inverse, torch.ones_like(logp))
        logp = torch.zeros(key.numel(), dtype=logp.dtype, device=logp.device).index_add_(0, inverse, logp) / count
        if ent is not None:
            ent = torch.zeros(key.numel(), dtype=ent.dtype, device=ent.device).index_add_(0, inverse, ent) / count
    order = torch.argsort(key)
    expected = sum(len(r) for r in response_ids)
    if logp.numel() != expected:
        raise RuntimeError(f"log-prob count {logp.numel()} != response tokens {expected} (bad step map?)")
    logp = logp[order] if padding is None else logp[order] + padding
    return logp, (ent[order] if ent is not None else None)


def _head_logprobs(states, head, *, tokens, temperature, with_entropy, support=None):
    """Run inside the model's forward: log-probs of ``tokens`` from the final states and the output layer."""
    return token_logprobs(states, head.weight, tokens, bias=head.bias, temperature=temperature,
                          with_entropy=with_entropy, support=support)


def sampling_support(top_k: int = 0, top_p: float = 1.0):
    """The rollout's top-k / top-p support as `token_logprobs`' ``support`` callable (None when both are off).

    It is the sampler's own rule (`lrl.rollout.unmasking.support_mask`) applied to the tempered logits, so training
    scores tokens under the distribution they were drawn from; `token_logprobs` always keeps the target token, so a
    token that left the support once the policy (or the reference) moved still gets a finite log-prob.
    """
    if not top_k and top_p >= 1.0:
        return None
    return partial(support_mask, top_k=top_k, top_p=top_p)
