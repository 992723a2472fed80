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
    response each row belongs to; copies (B,) noisy copies used by each row (the rest of K is padding).
    """

    input_ids: torch.Tensor
    lengths: torch.Tensor
    noisy: torch.Tensor
    targets: torch.Tensor
    sample: torch.Tensor
    copies: torch.Tensor | None = None

    def chunk(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, noisy, targets, lengths) of rows ``sl``, cut to those rows' longest row and copy count:
        rows are sorted by shape, so a forward over a chunk does not pad to the micro-batch's longest row."""
        lengths = self.lengths[sl]
        length = int(lengths.max()) if lengths.numel() else 0
        k = int(self.copies[sl].max()) if self.copies is not None and lengths.numel() else self.noisy.shape[1]
        return (self.input_ids[sl, :length], self.noisy[sl, :k, :length], self.targets[sl, :k, :length], lengths)


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
        copies=torch.tensor([len(c) for _, _, c in rows], device=device),
    )


def forward_tokens(lengths: torch.Tensor, noisy: torch.Tensor, block_size: int) -> int:
    """Positions one training forward runs through the decoder: rows × (copies × window + clean length), the
    shapes `BlockDiffusionLM.diffusion_hidden` builds (window: whole blocks from the block-aligned first masked
    position to the longest row's end). lengths (B,), noisy (B, K, L) bool."""
    if not lengths.numel():
        return 0
    masked = noisy.any(dim=1)
    first = torch.where(masked.any(dim=1), masked.long().argmax(dim=1), lengths)
    starts = torch.minimum(first, lengths) // block_size * block_size
    width = int(((lengths - starts).max() + block_size - 1) // block_size * block_size)
    return int(lengths.numel() * (noisy.shape[1] * width + noisy.shape[2]))


def single_pass_tokens(prompt_lens: list[int], full_lens: list[int], block_size: int) -> int:
    """Positions the single-pass estimator would run for these rows without padding: Σ (window + length), the
    window covering whole blocks from the block holding the first response token to the row's end."""
    total = 0
    for p, n in zip(prompt_lens, full_lens):
        start = p // block_size * block_size
        total += n + -(-(n - start) // block_size) * block_size
    return total


@dataclass(frozen=True)
class Scoring:
    """How `response_logprobs` and `backward_logprobs` score responses: the estimator, the packing, and the
    rollout's token distribution (module docstring).

    Args:
        estimator: ``trajectory``, ``single_pass`` or ``masked_states``.
        block_size: attention block size: the rollout block size, required by ``trajectory`` and
            ``masked_states``; ``single_pass`` uses the model's configured block size.
        pad_id: padding id of the packed rows.
        max_copies: noisy copies packed per row (trajectory rounds per forward).
        rows_per_forward: rows per forward pass (memory knob).
        temperature: the rollout's temperature (greedy rollouts: 1).
        top_k: the rollout's top-k (0: off; see `sampling_support`).
        top_p: the rollout's top-p (1: off).
    """

    estimator: Estimator
    block_size: int | None = None
    pad_id: int = 0
    max_copies: int = 8
    rows_per_forward: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def resolved_block_size(self, lm) -> int:
        if self.estimator == "single_pass":
            return lm.bd.block_size
        if self.block_size is None:
            raise ValueError(f"the {self.estimator} estimator needs block_size = the rollout block size")
        return self.block_size


class _Chunks:
    """The packed rows of one call and their forwards, ``rows_per_forward`` rows at a time."""

    def __init__(self, lm, prompt_ids, response_ids, step_maps, sc: Scoring, *, tail_ids, tail_step_maps, stats):
        self.lm, self.bs, self.rows_per_forward, self.stats = lm, sc.resolved_block_size(lm), sc.rows_per_forward, stats
        self.packed = pack_samples(prompt_ids, response_ids, step_maps, estimator=sc.estimator, block_size=self.bs,
                                   pad_id=sc.pad_id, max_copies=sc.max_copies, device=lm.device, tail_ids=tail_ids,
                                   tail_step_maps=tail_step_maps)
        lens = [len(r) for r in response_ids]
        self.expected = sum(lens)
        dev = self.packed.input_ids.device
        self.offset = torch.tensor([0, *lens[:-1]], device=dev).cumsum(0)  # first flat index of each response
        self.prompt_len = torch.tensor([len(p) for p in prompt_ids], device=dev)
        self.head_kw = {"temperature": sc.temperature, "support": sampling_support(sc.top_k, sc.top_p)}
        n = self.packed.input_ids.shape[0]
        self.slices = [slice(s, s + sc.rows_per_forward) for s in range(0, n, sc.rows_per_forward)]

    def forward(self, sl: slice, with_entropy: bool):
        """(log-probs, entropies or None, flat response-token index) of the targets of rows ``sl``."""
        ids, noisy, targets, lengths = self.packed.chunk(sl)
        b_idx, _, l_idx = targets.nonzero(as_tuple=True)
        # chunked over targets, recomputed in backward: memory does not grow with targets × vocabulary
        head = partial(_head_logprobs, tokens=ids[b_idx, l_idx], with_entropy=with_entropy, **self.head_kw)
        lp, ent = self.lm(ids, noisy, lengths, block_size=self.bs, select=targets, head=head)
        if self.stats is not None:
            self.stats["forward_tokens"] = self.stats.get("forward_tokens", 0) + forward_tokens(lengths, noisy,
                                                                                                self.bs)
        sample = self.packed.sample[sl][b_idx]
        return lp, ent, self.offset[sample] + l_idx - self.prompt_len[sample]

    def padding_pass(self) -> torch.Tensor:
        """A forward of the first row whose output × 0 keeps a rank's collectives in step with the others."""
        p = self.packed
        return self.lm(p.input_ids[:1], p.noisy[:1], p.lengths[:1], block_size=self.bs).sum() * 0.0

    def check(self, count: int) -> None:
        if count != self.expected:
            raise RuntimeError(f"log-prob count {count} != response tokens {self.expected} (bad step map?)")


def _mean_per_token(values: torch.Tensor, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``values`` per flat token index, count per index): masked_states' one value per token."""
    count = torch.zeros(size, device=values.device).index_add_(0, index, torch.ones_like(values))
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return total / count.clamp(min=1), count


def response_logprobs(lm: BlockDiffusionLM, prompt_ids, response_ids, step_maps, scoring: Scoring, *,
                      tail_ids: list[list[int]] | None = None, tail_step_maps: list[list[int]] | None = None,
                      with_entropy: bool = False, sync_forwards: Callable[[int], int] | None = None,
                      stats: dict | None = None):
    """Log-prob of every response token under ``lm`` (grad flows if enabled by the caller).

    With gradients enabled, every forward's activations stay alive until the caller's backward: for training
    use `backward_logprobs`, which runs the backward per forward.

    Args:
        lm: the policy or reference model.
        prompt_ids, response_ids, step_maps: per response (as in `RolloutBatch`).
        scoring: estimator, block size, packing and the rollout's sampling distribution (`Scoring`).
        tail_ids, tail_step_maps: per response, the final block's positions after a mid-block stop and their
            step ids (`RolloutBatch.tail_ids`); replayed, never scored. None: no tails.
        with_entropy: also return the (detached) entropy of each predicted distribution.
        sync_forwards: maps this rank's number of forward passes to the number to run (FSDP: the maximum over
            ranks, since every forward of a sharded model is a collective); the extra passes rerun the first
            packed row and are added to the result with weight 0, so their backward runs too.
        stats: if given, ``stats["forward_tokens"]`` is increased by the positions the forwards ran.
    Returns:
        logp (T,) with T = Σ response lengths, response-major; and entropy (T,) or None.
    """
    chunks = _Chunks(lm, prompt_ids, response_ids, step_maps, scoring, tail_ids=tail_ids,
                     tail_step_maps=tail_step_maps, stats=stats)
    padding = None  # the extra passes' outputs × 0, added to the result so their backward runs too
    if sync_forwards is not None:
        local = len(chunks.slices)
        for _ in range(sync_forwards(local) - local):
            out = chunks.padding_pass()
            padding = out if padding is None else padding + out
    vals, ents, index = [], [], []
    for sl in chunks.slices:
        lp, ent, idx = chunks.forward(sl, with_entropy)
        vals.append(lp)
        ents.append(ent)
        index.append(idx)
    logp, idx = torch.cat(vals), torch.cat(index)
    ent = torch.cat(ents) if with_entropy else None
    if scoring.estimator == "masked_states":  # one value per token: the mean over the states it was masked in
        chunks.check(int(idx.unique().numel()))
        logp, _ = _mean_per_token(logp, idx, chunks.expected)
        ent = _mean_per_token(ent, idx, chunks.expected)[0] if ent is not None else None
    else:
        chunks.check(logp.numel())
        order = torch.argsort(idx)
        logp, ent = logp[order], (ent[order] if ent is not None else None)
    return (logp if padding is None else logp + padding), ent


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, bool]]


def backward_logprobs(lm: BlockDiffusionLM, prompt_ids, response_ids, step_maps, scoring: Scoring, *,
                      loss_fn: LossFn, backward: Callable[[torch.Tensor], None],
                      tail_ids: list[list[int]] | None = None, tail_step_maps: list[list[int]] | None = None,
                      with_entropy: bool = False, sync_backwards: Callable[[int], int] | None = None,
                      stats: dict | None = None) -> None:
    """Forward and backward per ``rows_per_forward`` rows: at most one forward's activations are alive (issue 28).

    The loss must be a sum over tokens (as `lrl.algorithms.losses.lightningrl_loss` is, its normalisers global):
    ``loss_fn(logp, index, entropy)`` gets the log-probs of some tokens (``index`` (T_c,) long, their flat
    response-major positions, as in `response_logprobs`' output) and returns (that part of the loss, skip); the
    part is passed to ``backward`` unless ``skip`` (e.g. non-finite), then a zero keeps the backward count. The
    gradients equal those of ``backward(loss_fn(all logp))`` (tests/test_chunked_backward.py).

    * ``trajectory`` / ``single_pass``: each token is scored in exactly one forward, so each forward's tokens are
      a complete part of the loss.
    * ``masked_states``: a token's log-prob is the mean over states that may lie in different forwards, so a
      no-grad pass computes every token's log-prob first, ``loss_fn`` is called once on all of them to get
      ∂L/∂logp, and each forward then backpropagates Σ ∂L/∂logp_token · logp_state / count_token (one extra
      no-grad forward per row).

    ``sync_backwards`` maps this rank's number of forward+backward passes to the number to run (several ranks:
    every backward is a collective under DDP and FSDP); the extra passes backpropagate a zero.
    Other arguments: as `response_logprobs`.
    """
    tails = {"tail_ids": tail_ids, "tail_step_maps": tail_step_maps}
    grad_token = count = None
    if scoring.estimator == "masked_states":
        with torch.no_grad():
            full, ent = response_logprobs(lm, prompt_ids, response_ids, step_maps, scoring, with_entropy=with_entropy,
                                          sync_forwards=sync_backwards, stats=stats, **tails)
        leaf = full.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, skip = loss_fn(leaf, torch.arange(leaf.numel(), device=leaf.device), ent)
            grad_token = torch.zeros_like(leaf) if skip else torch.autograd.grad(loss, leaf)[0]
    chunks = _Chunks(lm, prompt_ids, response_ids, step_maps, scoring, stats=stats, **tails)
    if grad_token is not None:
        # states per token, counted without a forward (targets of the packed rows)
        b_idx, _, l_idx = chunks.packed.targets.nonzero(as_tuple=True)
        sample = chunks.packed.sample[b_idx]
        idx = chunks.offset[sample] + l_idx - chunks.prompt_len[sample]
        count = torch.zeros(chunks.expected, device=idx.device).index_add_(0, idx, torch.ones(idx.numel(),
                                                                                               device=idx.device))
    local = len(chunks.slices)
    extra = sync_backwards(local) - local if sync_backwards is not None else 0
    seen = 0
    for sl in chunks.slices:
        lp, ent, idx = chunks.forward(sl, with_entropy and grad_token is None)
        seen += lp.numel()
        if grad_token is None:
            part, skip = loss_fn(lp, idx, ent)
        else:
            part, skip = (lp * (grad_token[idx] / count[idx]).to(lp.dtype)).sum(), False
        backward(lp.sum() * 0.0 if skip else part)
    for _ in range(extra):
        backward(chunks.padding_pass())
    if grad_token is None:
        chunks.check(seen)


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
