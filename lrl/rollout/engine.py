"""The native block-diffusion rollout engine: batched, KV-cached, records step maps and TPF (spec §2).

Many prompts of different lengths decode at once. Each row advances on its own: blocks are aligned to absolute
positions of the row (the first generation block may hold the prompt tail), a row's KV cache holds its committed
blocks, and each engine iteration runs ONE batched forward over the rows still generating. In that forward a row
either denoises its current block (sample, score confidence, unmask, step += 1) or, once the block has no masks
left and generation goes on, re-encodes it with its final tokens and commits it (the store pass). The G samples of
a prompt share its prefill (the cache rows are copied after it). A finished response needs no store pass, so none
is run for its last block.

Cost: the per-row decisions of an iteration are a fixed number of tensor ops over all live rows (no per-row Python
loop); rows that finish are dropped from the state and from the cache at once, so the cache is read as a plain
slice, never gathered per forward; and the forwards use `_gqa_sdpa`, which avoids copying the K/V of the whole
context for every query head (transformers' masked ``sdpa`` does). On CUDA the one-block forwards need no mask at
all: the model passes per-row key lengths instead (`lrl.models.decode_attention`; ``lm.decode_attention``).

Counting (spec §2.5): ``step_map[i]`` is the 1-based denoising forward that unmasked generated token i; store
passes are not counted. ``num_forwards`` = number of distinct step ids among the returned tokens (the reference's
``len(set(step_map))``); TPF = returned tokens ÷ num_forwards.

Training records: ``sampling_logprobs[i]`` is the log-probability generated token i was drawn with (the processed
distribution of `sample_tokens`). Under ``eos_policy="truncate"`` a stop token mid-block still lets the whole block
decode; the positions after it (``tail_ids``, ``tail_step_maps``) are returned for training only, so the final
block can be replayed exactly as it was decoded.

dUltra (``remasking_strategy="planner"``): the forward also returns the final states, ``lm.planner`` turns the
masked positions' states (and confidences) into unmasking logits, `planner_decisions` picks the positions, and
`planner_logprob` of each step's decisions is recorded as ``RolloutBatch.planner_logprobs``. Tokens are drawn
exactly as for the other strategies; the Bernoulli draws come from a second generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.planner import planner_confidence
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch, SamplingParams
from lrl.rollout.unmasking import planner_decisions, planner_logprob, sample_tokens, select_unmask

_ATTN_IMPL = "lrl_gqa_sdpa"
_PLANNER_SEED_OFFSET = 0x5EED  # the planner's Bernoulli draws use their own stream, so tokens do not depend on them


class NativeEngine(RolloutGenerator):
    """In-process rollout generator over a `BlockDiffusionLM`.

    Args:
        lm: the block-diffusion model (its weights are the policy's; see `update_weights`).
        tokenizer: used to encode string prompts and decode responses.
        max_rows: most rows (prompts × samples) decoded at once; larger requests run in chunks of whole groups.
        progress: show a progress bar (off by default inside training).
        cuda_graphs: replay the one-block forwards as CUDA graphs (`lrl.models.cuda_graphs`), for small batches
            where eager decoding is launch-bound. The engine then keeps one KV cache (and the graphs captured over
            it) from call to call, grown when a call needs more rows or slots; `release` frees it. Needs the model
            on CUDA; rows whose pattern is not a key length fall back to the eager forward.
    """

    def __init__(self, lm: BlockDiffusionLM, tokenizer, *, max_rows: int = 512, progress: bool = False,
                 cuda_graphs: bool = False):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if cuda_graphs and lm.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {lm.device}")
        self.cuda_graphs = cuda_graphs
        self._graphs = None  # BlockForwardGraphs over the kept cache
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.progress = progress
        self.weight_version = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ interface
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Copy tensors into the engine's model in place (no reload from disk).

        Names are HF parameter names (``model.layers.0…``, ``lm_head.weight``); names of the `BlockDiffusionLM`
        wrapper (one more ``model.`` in front) are accepted too, and ``planner.*`` for a planner head. Every name
        and shape is checked before anything is copied, so a bad update leaves the weights and ``weight_version``
        as they were.
        """
        own = dict(self.lm.model.named_parameters())
        own.update(dict(self.lm.model.named_buffers()))
        if getattr(self.lm, "planner", None) is not None:
            own.update({f"planner.{k}": v for k, v in self.lm.planner.state_dict(keep_vars=True).items()})
        todo, unknown, bad_shape = [], [], []
        for name, tensor in weights.items() if isinstance(weights, Mapping) else weights:
            if name not in own and name.removeprefix("model.") in own:
                name = name.removeprefix("model.")
            if name not in own:
                unknown.append(name)
            elif tuple(tensor.shape) != tuple(own[name].shape):
                bad_shape.append(f"{name}: {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
            else:
                todo.append((own[name], tensor))
        if unknown:
            raise KeyError(f"update_weights: unknown parameter names {unknown[:5]}{'…' if len(unknown) > 5 else ''}")
        if bad_shape:
            raise ValueError(f"update_weights: shape mismatch {bad_shape[:5]}{'…' if len(bad_shape) > 5 else ''}")
        with torch.no_grad():
            for dst, src in todo:
                dst.copy_(src.to(dst.device, dst.dtype))
        self.weight_version = self.weight_version + 1 if version is None else int(version)

    def release(self) -> None:
        """Free the KV cache and CUDA graphs kept between calls (``cuda_graphs=True``)."""
        self._graphs = None

    def _cache(self, rows: int, capacity: int, slots: int, block_size: int):
        """A cache for ``rows`` prefilled rows growing to ``capacity``; with CUDA graphs, the kept one when it
        is large enough and of the same block size (its graphs stay valid), else a new one."""
        if not self.cuda_graphs:
            return self.lm.new_cache(rows, slots)
        from lrl.models.cuda_graphs import BlockForwardGraphs

        kept = self._graphs
        if (kept is None or kept.block_size != block_size or kept.cache.capacity < capacity
                or kept.cache.max_len < slots):
            if kept is not None:
                capacity, slots = max(capacity, kept.cache.capacity), max(slots, kept.cache.max_len)
            kept = self._graphs = None  # free the old buffers before allocating the new ones
            cache = self.lm.new_cache(rows, slots, capacity=capacity)
            self._graphs = BlockForwardGraphs(self.lm, cache, block_size=block_size)
        self._graphs.cache.reset(rows)
        return self._graphs.cache

    def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        sampling.validate()
        if len(prompts) == 0:
            raise ValueError("generate() needs at least one prompt")
        ids = self.encode(prompts)
        limit = self.lm.max_length
        for i, p in enumerate(ids):
            if len(p) + sampling.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} it exceeds the "
                    f"model's context of {limit} positions"
                )
        g = sampling.samples_per_prompt
        per_chunk = max(1, self.max_rows // g)
        gen = torch.Generator(device=self.lm.device).manual_seed(sampling.seed)
        plan_gen = None
        if sampling.remasking_strategy == "planner":
            if getattr(self.lm, "planner", None) is None:
                raise ValueError("remasking_strategy 'planner' needs a model with a planner head (lm.planner is None)")
            plan_gen = torch.Generator(device=self.lm.device).manual_seed(sampling.seed + _PLANNER_SEED_OFFSET)
        bar = _progress(len(ids) * g, self.progress)
        parts = []
        for start in range(0, len(ids), per_chunk):
            parts.append(self._generate_chunk(ids[start : start + per_chunk], sampling, gen, bar, plan_gen))
        if bar is not None:
            bar.close()
        batch = RolloutBatch.concat(parts)
        batch.weight_version = self.weight_version
        return batch

    # ------------------------------------------------------------------ decoding
    def _generate_chunk(self, prompts: list[list[int]], sp: SamplingParams, gen, bar, plan_gen=None) -> RolloutBatch:
        lm, dev, bsz = self.lm, self.lm.device, sp.block_size
        g, n = sp.samples_per_prompt, len(prompts)
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        slots = int(((plen + sp.max_new_tokens + bsz - 1) // bsz * bsz).max())
        cache = self._cache(n, n * g, slots, bsz)
        full = plen // bsz * bsz
        width = int(full.max())
        with _fast_attention(lm):
            if width > 0:  # prefill: every full prompt block, block-causal, committed at once
                chunk = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
                for i, p in enumerate(prompts):
                    chunk[i, : int(full[i])] = torch.tensor(p[: int(full[i])], device=dev)
                valid = torch.arange(width, device=dev)[None] < full[:, None]
                lm.forward_chunk(cache, chunk, block_size=bsz, key_valid=valid, store=full)
            cache.repeat_interleave(g)
            out = _Outputs.start(prompts, g, slots, sp.max_new_tokens, self.pad_id, dev)
            if plan_gen is not None:  # one entry per possible step (each step unmasks at least one token)
                out.plan_lp = torch.zeros(out.tokens.shape[0], slots, device=dev)
            self._decode(_LiveRows.start(cache, out, bsz, lm.bd.mask_token_id), cache, out, sp, gen, bar, plan_gen)
        return self._collect(prompts, g, out, sp)

    def _decode(self, st: _LiveRows, cache, out: _Outputs, sp: SamplingParams, gen, bar, plan_gen=None) -> None:
        """The engine loop: one batched forward per iteration over the live rows, until every row has finished."""
        bsz, mask_id, pad_id = sp.block_size, self.lm.bd.mask_token_id, self.pad_id
        offs = torch.arange(bsz, device=out.tokens.device)
        stop_ids = torch.tensor(sorted(set(sp.stop_token_ids)), dtype=torch.long, device=out.tokens.device)
        k = sp.tokens_per_step()
        storing_any = False
        while st.live.numel():
            pos = cache.lengths[:, None] + offs  # (A, B) absolute positions of each row's current block
            in_budget = pos < st.budget[:, None]
            store = st.storing.long() * bsz if storing_any else None
            logits = None
            if self._graphs is not None:
                logits = self._graphs.forward(st.cur, key_valid=in_budget, store=store,
                                              return_states=plan_gen is not None)
            if logits is None:
                logits = self.lm.forward_chunk(cache, st.cur, block_size=bsz, key_valid=in_budget, store=store,
                                               return_states=plan_gen is not None)
            if plan_gen is not None:
                logits, states = logits

            # denoise: sample every masked position, unmask the chosen ones (store rows have no masked position)
            masked = st.masked
            sel = masked.nonzero(as_tuple=True)
            if sel[0].numel():
                tok, c, lp = sample_tokens(logits[sel], greedy=sp.greedy, temperature=sp.temperature,
                                           top_k=sp.top_k, top_p=sp.top_p, generator=gen, with_logprobs=True)
                conf = torch.zeros(masked.shape, dtype=c.dtype, device=c.device).index_put_(sel, c)
                drawn_lp = torch.zeros(masked.shape, dtype=lp.dtype, device=lp.device).index_put_(sel, lp)
                drawn = st.cur.index_put(sel, tok)
                if plan_gen is None:
                    chosen = select_unmask(conf, masked, strategy=sp.remasking_strategy, threshold=sp.threshold, k=k)
                else:
                    plan = torch.zeros(masked.shape, device=c.device).index_put_(
                        sel, self.lm.planner(states[sel], planner_confidence(logits[sel])))
                    chosen = planner_decisions(plan, masked, greedy=sp.greedy, threshold=sp.planner_threshold,
                                               generator=plan_gen)
                progressed = chosen.any(1)
                st.steps += progressed
                if plan_gen is not None:
                    out.plan_lp[st.live[progressed], st.steps[progressed] - 1] = planner_logprob(
                        plan, masked, chosen)[progressed]
                st.cur = torch.where(chosen, drawn, st.cur)
                st.step = torch.where(chosen, st.steps[:, None], st.step)
                st.logp = torch.where(chosen, drawn_lp, st.logp)
                st.masked = masked = masked & ~chosen
                done = progressed & ~masked.any(1)  # blocks completed by this forward
            else:
                done = torch.zeros_like(st.storing)

            if storing_any:  # rows that just committed their block open the next one
                st.stores += st.storing
                new = st.storing[:, None] & ((cache.lengths[:, None] + offs) < st.budget[:, None])
                fresh = torch.full_like(st.cur, pad_id).masked_fill_(new, mask_id)
                st.cur = torch.where(st.storing[:, None], fresh, st.cur)
                st.masked = st.masked | new
                st.step = st.step.masked_fill(st.storing[:, None], 0)
                st.logp = st.logp.masked_fill(st.storing[:, None], 0.0)
            st.storing = done
            storing_any = bool(done.any())
            if not storing_any:
                continue

            # completed blocks: record them, then check the stop conditions (spec §2.4: only on complete blocks)
            rows = st.live[:, None]
            out.tokens[rows, pos] = torch.where(done[:, None], st.cur, out.tokens[rows, pos])
            out.step_map[rows, pos] = torch.where(done[:, None], st.step, out.step_map[rows, pos])
            out.logp[rows, pos] = torch.where(done[:, None], st.logp, out.logp[rows, pos])
            gen_pos = (pos >= st.plen[:, None]) & in_budget  # positions past the budget are never generated
            hit = (st.cur[..., None] == stop_ids).any(-1) & gen_pos
            has_stop = done & hit.any(1)
            fin = has_stop | (done & (pos[:, -1] + 1 >= st.budget))
            if not bool(fin.any()):
                continue
            if sp.eos_policy == "truncate":
                stop_end = pos[:, 0] + hit.int().argmax(1) + 1  # argmax: the first stop id of the block
            else:
                stop_end = torch.minimum(pos[:, -1] + 1, st.budget)
            ended = st.live[fin]
            out.end[ended] = torch.where(has_stop, stop_end, st.budget)[fin]
            out.stores[ended] = st.stores[fin]
            for r, s in zip(ended.tolist(), has_stop[fin].tolist()):
                out.finish[r] = "stop" if s else "length"
            if bar is not None:
                bar.update(ended.numel())
            st.storing = done & ~fin
            st.keep(~fin, cache)
            storing_any = bool(st.storing.any())

    def _collect(self, prompts: list[list[int]], g: int, out: _Outputs, sp: SamplingParams) -> RolloutBatch:
        tokens, step_map, logp = out.tokens.cpu(), out.step_map.cpu(), out.logp.cpu()  # one transfer each
        resp_ids, smaps, lps, tail_ids, tail_steps, nfwd = [], [], [], [], [], []
        plan_lp = out.plan_lp.cpu() if out.plan_lp is not None else None
        plan_lps = [] if plan_lp is not None else None
        bsz = sp.block_size
        for r, (a, b) in enumerate(zip(out.plen.tolist(), out.end.tolist())):
            resp_ids.append(tokens[r, a:b].tolist())
            smaps.append(step_map[r, a:b].tolist())
            lps.append(logp[r, a:b].tolist())
            nfwd.append(len(set(smaps[-1])))
            # truncate stopped mid-block: the rest of the final block, for an exact replay in training only
            tail_end = min(-(-b // bsz) * bsz, a + sp.max_new_tokens)
            tail_ids.append(tokens[r, b:tail_end].tolist())
            tail_steps.append(step_map[r, b:tail_end].tolist())
            if plan_lps is not None:
                plan_lps.append(plan_lp[r, : max(smaps[-1] + tail_steps[-1], default=0)].tolist())
        return RolloutBatch(
            prompt_ids=[list(prompts[r // g]) for r in range(len(resp_ids))],
            response_ids=resp_ids,
            texts=self.tokenizer.batch_decode(resp_ids, skip_special_tokens=True),
            step_maps=smaps,
            num_forwards=torch.tensor(nfwd, dtype=torch.long),
            num_store_passes=out.stores.cpu(),
            finish_reasons=out.finish,
            group_index=torch.arange(len(prompts)).repeat_interleave(g),
            weight_version=self.weight_version,
            sampling_logprobs=lps,
            tail_ids=tail_ids,
            tail_step_maps=tail_steps,
            sampling=sp,
            planner_logprobs=plan_lps,
        )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rollout", unit="resp", leave=False)


@dataclass
class _Outputs:
    """What the loop writes for every row (prompt i, sample j -> row i·G + j), finished or not."""

    tokens: torch.Tensor  # (N, slots) prompt, then generated ids as their blocks complete (pad elsewhere)
    step_map: torch.Tensor  # (N, slots) step id of each generated position
    logp: torch.Tensor  # (N, slots) float, sampling log-prob of each generated position
    plen: torch.Tensor  # (N,) prompt length
    end: torch.Tensor  # (N,) exclusive end of the returned response
    stores: torch.Tensor  # (N,) store passes
    finish: list[str]  # "stop" or "length"
    plan_lp: torch.Tensor | None = None  # (N, slots) planner rollouts: decision log-prob of step s at s - 1

    @classmethod
    def start(cls, prompts: list[list[int]], g: int, slots: int, max_new: int, pad_id: int, dev) -> _Outputs:
        rows = len(prompts) * g
        tokens = torch.full((rows, slots), pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i * g : (i + 1) * g, : len(p)] = torch.tensor(p, device=dev)
        plen = torch.tensor([len(p) for p in prompts], device=dev).repeat_interleave(g)
        return cls(tokens, torch.zeros_like(tokens), torch.zeros(tokens.shape, device=dev), plen, plen + max_new,
                   torch.zeros(rows, dtype=torch.long, device=dev), [""] * rows)


@dataclass
class _LiveRows:
    """Decoding state of the rows still generating; row i of every tensor is row i of the KV cache."""

    live: torch.Tensor  # (A,) original row index
    plen: torch.Tensor  # (A,) prompt length
    budget: torch.Tensor  # (A,) first absolute position that may not be generated
    cur: torch.Tensor  # (A, B) tokens of the current block, MASK where still masked
    masked: torch.Tensor  # (A, B) bool, positions of the current block still to be generated
    step: torch.Tensor  # (A, B) step id that unmasked each position (0: prompt or still masked)
    logp: torch.Tensor  # (A, B) float, sampling log-prob of the token unmasked at each position
    steps: torch.Tensor  # (A,) denoising forwards so far
    stores: torch.Tensor  # (A,) store passes so far
    storing: torch.Tensor  # (A,) bool, the next forward is this row's store pass

    @classmethod
    def start(cls, cache, out: _Outputs, bsz: int, mask_id: int) -> _LiveRows:
        """Open the first block of every row at ``cache.lengths`` (it may hold the prompt tail)."""
        rows, dev = out.tokens.shape[0], out.tokens.device
        pos = cache.lengths[:, None] + torch.arange(bsz, device=dev)
        masked = (pos >= out.plen[:, None]) & (pos < out.end[:, None])
        cur = torch.where(masked, mask_id, out.tokens.gather(1, pos))
        zeros = torch.zeros(rows, dtype=torch.long, device=dev)
        return cls(torch.arange(rows, device=dev), out.plen.clone(), out.end.clone(), cur, masked,
                   torch.zeros_like(cur), torch.zeros(cur.shape, device=dev), zeros, zeros.clone(), zeros.bool())

    def keep(self, keep: torch.Tensor, cache) -> None:
        """Drop finished rows from the state and from the cache (one copy now instead of a gather per forward)."""
        idx = keep.nonzero().squeeze(1)
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name)[idx])
        cache.keep_rows(idx)


_MASK_CACHE: dict = {}  # the current forward's additive mask, built once and shared by every layer


def _additive_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(A, 1, groups·T, S) additive mask from the (A, 1, T, S) mask of this forward, cached across its layers."""
    hit = _MASK_CACHE.get("last")
    if hit is not None and hit[0] is mask and hit[1] == (groups, dtype):
        return hit[2]
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    else:
        bias = mask.to(dtype)
    if groups > 1:
        bias = bias.repeat(1, 1, groups, 1)
    _MASK_CACHE["last"] = (mask, (groups, dtype), bias)
    return bias


def _gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention that stacks a group's query heads instead of repeating K/V.

    transformers' ``sdpa`` repeats K/V for every query head whenever a mask is given, a full copy of the (strided)
    cache view per layer and forward that dominates a small block's cost. The block mask is shared by all heads
    ((A, 1, T, S)), so the ``groups`` query heads of a KV head can be laid along the query axis instead:
    (A, Hkv, groups·T, D) queries against the (A, Hkv, S, D) K/V, the mask tiled ``groups`` times. Same result.
    The mask is turned into an additive float mask once per forward (SDPA would convert it in every layer).
    """
    mask = attention_mask
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or query.shape[1] % key.shape[1]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    a, hq, t, d = query.shape
    groups = hq // key.shape[1]
    q = query.reshape(a, key.shape[1], groups * t, d)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=_additive_mask(mask, groups, query.dtype),
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.reshape(a, hq, t, d).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _fast_attention(lm: BlockDiffusionLM):
    """Run the engine's forwards with `_gqa_sdpa` when the model uses plain ``sdpa`` (restored afterwards)."""
    cfg = lm.hf_config
    old = cfg._attn_implementation
    if old != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_IMPL, _gqa_sdpa)
    cfg._attn_implementation = _ATTN_IMPL
    try:
        yield
    finally:
        cfg._attn_implementation = old
        _MASK_CACHE.clear()
