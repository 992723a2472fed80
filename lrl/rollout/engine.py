"""The native block-diffusion rollout engine: paged KV memory, a byte budget, continuous batching (spec §2).

Many prompts of different lengths decode at once. Each row advances on its own: blocks are aligned to absolute
positions of the row (the first generation block may hold the prompt tail), and each engine iteration runs ONE
batched forward over the rows still generating. In that forward a row either denoises its current block (sample,
score confidence, unmask, step += 1) or, once the block has no masks left and generation goes on, re-encodes it
with its final tokens and commits it (the store pass). A finished response needs no store pass.

Memory (`lrl.models.paged_kv`): the KV cache is a pool of pages of one block each, sized by ``kv_cache_gb``; a row
holds the pages of the blocks it has written, the G samples of a prompt share its full prompt blocks, and a row that
finishes returns its pages at once, moving no other row's K/V. Per-forward transients are bounded by
``transient_gb``: logits are computed only at masked positions, in chunks of positions, and attention gathers the
rows' pages in chunks of rows.

Continuous batching: prompt groups wait in a queue; whenever rows and pages are free (``max_rows``, the pool), the
next groups are prefilled (one forward, not a denoising step), copied to their G samples and join the running
batch, so the forward keeps its row count up until the prompts run out. When a row needs a page for its next block
and none is free, the youngest admitted rows are preempted (their pages freed, their prompts queued again) and
decoded again later. Every random draw is keyed by (seed, request row, the row's step, position in block)
(`lrl.rollout.unmasking.draw_keys`), so a row's tokens, step map and log-probs do not depend on which rows share
its forwards, on the budget, or on being restarted.

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
exactly as for the other strategies; the Bernoulli draws use their own key stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.planner import planner_confidence
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.engine_state import RolloutStats, _LiveRows, _Outputs
from lrl.rollout.types import RolloutBatch, SamplingParams
from lrl.rollout.unmasking import (
    draw_keys,
    keyed_uniform,
    planner_decisions,
    planner_logprob,
    sample_tokens,
    select_unmask,
)

_GB = 1e9
_SAMPLE_BYTES = 64  # transient bytes per (masked position × vocabulary entry) of one sampling chunk
_KV_KNOB = "data.init_args.rollout.kv_cache_gb"

# A logits processor sees (logits (M, V), request rows (M,), absolute positions (M,)) and returns logits.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class NativeEngine(RolloutGenerator):
    """In-process rollout generator over a `BlockDiffusionLM`.

    Args:
        lm: the block-diffusion model (its weights are the policy's; see `update_weights`).
        tokenizer: used to encode string prompts and decode responses.
        max_rows: most rows (prompts × samples) in one forward. With ``continuous`` a group may join in parts (at
            least a quarter of it; one more prefill each), so rows that free up are filled; a group larger than this
            runs in parts.
        progress: show a progress bar (off by default inside training).
        cuda_graphs: replay the one-block forwards as CUDA graphs (`lrl.models.cuda_graphs`), for small batches
            where eager decoding is launch-bound. The engine then keeps its page pool (and the graphs captured
            over it) from call to call; `release_memory` frees them. Needs the model on CUDA.
        kv_cache_gb: KV budget in GB (10⁹ bytes): the page pool holds this many bytes; rows are admitted while
            pages are free, and the pool never grows. None: the dense worst case (``max_rows`` rows at the full
            budget), so nothing is ever preempted.
        transient_gb: bound on one forward's transients, in GB: logits and sampling over the vocabulary run in
            chunks of masked positions, attention gathers rows' pages in chunks of rows, each within this.
        continuous: admit new prompt groups whenever rows and pages free up (continuous batching). False runs
            whole chunks of groups one after the other, as the engine did before pages (a benchmark baseline).
        logits_processor: optional hook applied to the logits of masked positions before sampling (token bans,
            scripted stops in benchmarks); see `LogitsProcessor`.
        record_tokens: also record the KV slots held per iteration (`RolloutStats.tokens_held`; one more host
            sync per iteration).
        offload_weights: the engine holds its own weight copy (not the policy's tensors): `release_memory` moves
            it to the CPU for the training phase and the next `generate` brings it back (weight updates work on
            either side).
    """

    def __init__(self, lm: BlockDiffusionLM, tokenizer, *, max_rows: int = 512, progress: bool = False,
                 cuda_graphs: bool = False, kv_cache_gb: float | None = None, transient_gb: float = 2.0,
                 continuous: bool = True, logits_processor: LogitsProcessor | None = None,
                 record_tokens: bool = False, offload_weights: bool = False):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0 (or None for the dense worst case), got {kv_cache_gb}")
        if not transient_gb > 0:
            raise ValueError(f"transient_gb must be > 0, got {transient_gb}")
        if cuda_graphs and lm.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {lm.device}")
        self.lm, self.tokenizer = lm, tokenizer
        self.max_rows, self.progress, self.cuda_graphs = max_rows, progress, cuda_graphs
        self.kv_cache_gb, self.transient_gb, self.continuous = kv_cache_gb, transient_gb, continuous
        self.logits_processor, self.record_tokens = logits_processor, record_tokens
        self.offload_weights, self._device = offload_weights, lm.device
        self.weight_version = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats: RolloutStats | None = None  # of the last generate call
        self._graphs = None  # BlockForwardGraphs over the kept pool (cuda_graphs)

    # ------------------------------------------------------------------ interface
    def reads_weights_of(self, lm: torch.nn.Module) -> bool:
        """The engine decodes with ``lm`` itself (the policy, no copy): a sync has nothing to copy."""
        return self.lm is lm

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Copy tensors into the engine's model in place (no reload from disk).

        Names are HF parameter names (``model.layers.0…``, ``lm_head.weight``); names of the `BlockDiffusionLM`
        wrapper (one more ``model.`` in front) are accepted too, and ``planner.*`` for a planner head. Every name
        and shape is checked before anything is copied, so a bad update leaves the weights and ``weight_version``
        as they were.
        """
        own = dict(self.lm.model.named_parameters(remove_duplicate=False))  # a tied head by its own name too
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

    def last_stats(self) -> dict[str, float]:
        """The last call's KV and batching figures: pool and peak KV bytes (GB), mean rows per forward, rows
        preempted, engine iterations, admission prefills."""
        s = self.stats
        if s is None or not s.rows:
            return {}
        return {"rollout/kv_pool_gb": s.pool_pages * s.page_bytes / _GB,
                "rollout/kv_peak_gb": s.peak_kv_bytes / _GB,
                "rollout/rows_per_forward": sum(s.rows) / len(s.rows),
                "rollout/preempted_rows": float(s.preempted_rows),
                "rollout/engine_iterations": float(len(s.rows)),
                "rollout/prefills": float(s.prefills)}

    def release_memory(self) -> None:
        """Free the page pool and CUDA graphs kept between calls, and the allocator's cached blocks; with
        ``offload_weights``, move the engine's weight copy to the CPU until the next `generate`."""
        self._graphs = None
        if self.offload_weights and self.lm.device.type != "cpu":
            self.lm.to("cpu")
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Bring an offloaded weight copy back to its device (also done by `generate`)."""
        if self.lm.device != self._device:
            self.lm.to(self._device)

    def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ memory plan of one call
    def pages_for(self, prompt_lens: Sequence[int], sp: SamplingParams) -> dict:
        """The page geometry of a request: blocks per row, the pages one row needs at worst (its whole budget),
        and the dense worst case (``max_rows`` rows at their whole budget)."""
        bsz, g = sp.block_size, sp.samples_per_prompt
        blocks = [-(-(p + sp.max_new_tokens) // bsz) for p in prompt_lens]
        worst = max(blocks)
        rows = self.max_rows if self.continuous else max(g, self.max_rows // g * g)
        dense = min(len(prompt_lens) * g, rows) * max(blocks)
        return dict(max_blocks=max(blocks), worst_row=worst, dense=dense, rows=rows)

    def _pool(self, prompt_lens: list[int], sp: SamplingParams):
        """The call's page pool: sized by ``kv_cache_gb`` (or the dense worst case); kept with CUDA graphs."""
        lm, bsz = self.lm, sp.block_size
        geo = self.pages_for(prompt_lens, sp)
        page_bytes = lm.kv_bytes_per_token() * bsz
        pages = geo["dense"] + 1 if self.kv_cache_gb is None else round(self.kv_cache_gb * _GB) // page_bytes
        if geo["worst_row"] + 1 > pages:
            need = (geo["worst_row"] + 1) * page_bytes / _GB
            raise ValueError(
                f"KV budget too small: one response (prompt up to {max(prompt_lens)} + {sp.max_new_tokens} new "
                f"tokens) needs {need:.3g} GB of KV pages, the budget holds {pages * page_bytes / _GB:.3g} GB; "
                f"raise {_KV_KNOB} (or lower max_new_tokens)")
        cfg = lm.hf_config
        heads = cfg.num_attention_heads
        _, kv_heads, head_dim = lm._kv_geometry()
        per_slot = 2 * kv_heads * head_dim * lm.dtype.itemsize + (heads + heads // kv_heads) * bsz * 4
        gather = max(int(self.transient_gb * _GB // per_slot), geo["max_blocks"] * bsz)
        kept = self._graphs
        if kept is not None:
            c = kept.cache
            if (c.page_size == bsz and c.num_pages >= pages and c.capacity >= geo["rows"]
                    and c.max_blocks >= geo["max_blocks"]):
                c.reset()
                return c, c.num_pages - 1
            self._graphs = None  # free the old pool before allocating the new one
        cache = lm.new_paged_cache(pages, bsz, geo["rows"], geo["max_blocks"],
                                   gather_tokens=None if self.cuda_graphs else gather)
        if self.cuda_graphs:
            from lrl.models.cuda_graphs import BlockForwardGraphs

            self._graphs = BlockForwardGraphs(lm, cache, block_size=bsz)
        return cache, pages - 1

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        sp = sampling
        sp.validate()
        if len(prompts) == 0:
            raise ValueError("generate() needs at least one prompt")
        self.resume_memory()
        ids = self.encode(prompts)
        limit = self.lm.max_length
        for i, p in enumerate(ids):
            if len(p) + sp.max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={sp.max_new_tokens} it exceeds the "
                    f"model's context of {limit} positions"
                )
        if sp.remasking_strategy == "planner" and getattr(self.lm, "planner", None) is None:
            raise ValueError("remasking_strategy 'planner' needs a model with a planner head (lm.planner is None)")
        cache, pool_pages = self._pool([len(p) for p in ids], sp)
        g, bsz = sp.samples_per_prompt, sp.block_size
        self.stats = RolloutStats(bsz, cache.page_bytes, pool_pages, cache.capacity)
        out = _Outputs.start(ids, g, cache.max_len, sp.max_new_tokens, self.pad_id, self.lm.device,
                             planner=sp.remasking_strategy == "planner")
        queue = deque((i, tuple(range(g))) for i in range(len(ids)))
        bar = _progress(len(ids) * g, self.progress)
        try:
            self._decode(ids, queue, cache, out, sp, bar)
        finally:
            if bar is not None:
                bar.close()
            if not self.cuda_graphs:
                del cache  # the pool is this call's; only the CUDA-graph engine keeps it
        batch = self._collect(ids, g, out, sp)
        batch.weight_version = self.weight_version
        return batch

    # ------------------------------------------------------------------ admission and preemption
    def _admit(self, ids, queue: deque, st: _LiveRows, cache, out: _Outputs, sp: SamplingParams, adm: int) -> int:
        """Prefill the next queued groups that fit (rows and pages) and add their samples to the live rows; each
        row gets its own admission number from ``adm`` on (preemption takes the youngest row first). Returns how
        many rows were admitted."""
        bsz, cap = sp.block_size, cache.capacity
        first = len(ids[queue[0][0]]) // bsz + len(queue[0][1])
        if st.n and (st.n + len(queue[0][1]) > cap or first > cache.free_pages):
            return 0  # host-side checks first: the next group cannot fit (no device sync)
        # pages kept free: one for every live row that will open another block, and once the pool has run out
        # (rows were preempted), an eighth of the pool, so rows just admitted are not the next ones preempted
        reserve = (self._reserve(st, cache) if st.n else 0) + self._watermark
        take, rows, pages = [], st.n, 0
        while queue:
            i, samples = queue[0]
            pblocks = len(ids[i]) // bsz
            grows = int(pblocks * bsz + bsz < len(ids[i]) + sp.max_new_tokens)  # a row opens a second block
            # samples of this group that fit: rows, and pages for the shared prompt + a first block (+ reserve)
            room = min(cap - rows, (cache.free_pages - pages - reserve - pblocks) // (1 + grows))
            part = self.continuous and room >= max(1, len(samples) // 4)  # the chunked schedule takes whole groups
            k = len(samples) if room >= len(samples) else room if part else 0
            if k == 0 and not take and not st.n:
                k = max(1, min(len(samples), cap, cache.free_pages - pblocks))  # nothing running: progress first
            if k == 0:
                break
            queue.popleft()
            if k < len(samples):  # a part of the group now (one more prefill later), the rest stays first in line
                queue.appendleft((i, samples[k:]))
                self.stats.partial_admissions += 1
            take.append((i, samples[:k]))
            rows, pages, reserve = rows + k, pages + pblocks + k, reserve + grows * k
            if k < len(samples) or (not self.continuous and rows >= cap):
                break
        if not take:
            return 0
        lm, dev = self.lm, self.lm.device
        prompts = [ids[i] for i, _ in take]
        full = [len(p) // bsz * bsz for p in prompts]
        new = cache.add_rows([cache.alloc(f // bsz) for f in full])
        width = max(full)
        if width > 0:  # prefill: every full prompt block, block-causal, committed at once (no logits needed)
            chunk = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=dev)
            for k, p in enumerate(prompts):
                chunk[k, : full[k]] = torch.tensor(p[: full[k]], device=dev)
            full_t = torch.tensor(full, device=dev)
            valid = torch.arange(width, device=dev)[None] < full_t[:, None]
            lm.forward_chunk(cache, chunk, rows=new, block_size=bsz, key_valid=valid, store=full_t, logits=False)
            self.stats.prefills += 1
        cache.expand_rows(new, [len(s) for _, s in take])
        g = sp.samples_per_prompt
        req = torch.tensor([i * g + j for i, s in take for j in s], dtype=torch.long, device=dev)
        added = torch.arange(st.n, st.n + req.numel(), device=dev)
        cache.open_block(added, cache.lengths[added] // bsz)  # (preempted rows' outputs were reset then)
        st.extend(_LiveRows.start(req, torch.arange(adm, adm + req.numel(), device=dev), cache.lengths[added], out,
                                  bsz, lm.bd.mask_token_id))
        return req.numel()

    @staticmethod
    def _reserve(st: _LiveRows, cache) -> int:
        """Live rows whose current block is not their last: each will need one more page."""
        return int(((cache.lengths + st.cur.shape[1]) < st.budget).sum())

    def _make_room(self, st: _LiveRows, cache, queue: deque, out: _Outputs, opening: torch.Tensor):
        """Free pages until every row in ``opening`` (bool (A,)) can open its next block, by preempting the youngest
        rows (they go back to the front of the queue and are decoded again later, identically: their draws are
        keyed). The oldest row always fits (checked before decoding), so decoding always progresses.
        Returns the indices of the rows kept, or None when nothing was preempted."""
        kept = None
        g = self._g
        while int(opening.sum()) > cache.free_pages:
            youngest = int(st.adm.max())
            gone = st.adm == youngest
            if bool(gone.all()):
                raise RuntimeError("paged KV cache: the oldest row alone does not fit (the budget check failed)")
            rows = st.live[gone].tolist()
            for r in rows:  # back to the front of the queue, merged with the queued rest of its group
                if queue and queue[0][0] == r // g:
                    queue[0] = (r // g, tuple(sorted({r % g, *queue[0][1]})))
                else:
                    queue.appendleft((r // g, (r % g,)))
            out.restart(st.live[gone], self.pad_id)
            self.stats.preempted_rows += len(rows)
            self._watermark = cache.num_pages // 8
            idx = (~gone).nonzero().squeeze(1)
            kept = idx if kept is None else kept[idx]
            opening = opening[idx]
            st.keep(~gone, cache)
        return kept

    # ------------------------------------------------------------------ decoding
    def _decode(self, ids, queue: deque, cache, out: _Outputs, sp: SamplingParams, bar) -> None:
        """The engine loop: admit, one batched forward over the live rows, bookkeeping; until all rows finished."""
        lm, dev = self.lm, self.lm.device
        bsz, mask_id, pad_id = sp.block_size, lm.bd.mask_token_id, self.pad_id
        self._g, self._watermark = sp.samples_per_prompt, 0
        offs = torch.arange(bsz, device=dev)
        stop_ids = torch.tensor(sorted(set(sp.stop_token_ids)), dtype=torch.long, device=dev)
        k = sp.tokens_per_step()
        planner = sp.remasking_strategy == "planner"
        vocab = lm.hf_config.vocab_size
        chunk = max(1, int(self.transient_gb * _GB // (vocab * _SAMPLE_BYTES)))
        st = _LiveRows.empty(bsz, dev)
        adm, storing_any = 0, False
        stats = self.stats
        while True:
            if queue and (self.continuous or st.n == 0):
                if admitted := self._admit(ids, queue, st, cache, out, sp, adm):
                    stats.admitted_at.append(len(stats.rows))
                    adm += admitted
            if st.n == 0:
                break
            pos = cache.lengths[:, None] + offs  # (A, B) absolute positions of each row's current block
            in_budget = pos < st.budget[:, None]
            store = st.storing.long() * bsz if storing_any else None
            states = None
            if self._graphs is not None:
                states = self._graphs.forward(st.cur, key_valid=in_budget, store=store, logits=False)
            if states is None:
                states = lm.forward_chunk(cache, st.cur, block_size=bsz, key_valid=in_budget, store=store,
                                          logits=False)
            stats.rows.append(st.n)

            # denoise: sample every masked position, unmask the chosen ones (store rows have no masked position)
            masked = st.masked
            sel = masked.nonzero(as_tuple=True)
            if sel[0].numel():
                tok, c, lp, plan = self._sample(states, sel, st, pos, sp, chunk, planner)
                conf = torch.zeros(masked.shape, dtype=c.dtype, device=dev).index_put_(sel, c)
                drawn_lp = torch.zeros(masked.shape, dtype=lp.dtype, device=dev).index_put_(sel, lp)
                drawn = st.cur.index_put(sel, tok)
                if not planner:
                    chosen = select_unmask(conf, masked, strategy=sp.remasking_strategy, threshold=sp.threshold, k=k)
                else:
                    plan = torch.zeros(masked.shape, device=dev).index_put_(sel, plan)
                    keys = draw_keys(sp.seed, st.live[:, None].expand_as(masked), (st.steps + 1)[:, None].expand_as(
                        masked), offs.expand_as(masked), stream=1)
                    chosen = planner_decisions(plan, masked, greedy=sp.greedy, threshold=sp.planner_threshold,
                                               uniforms=keyed_uniform(keys.reshape(-1)).view(masked.shape))
                progressed = chosen.any(1)
                st.steps += progressed
                if planner:
                    out.plan_lp[st.live[progressed], st.steps[progressed] - 1] = planner_logprob(
                        plan, masked, chosen)[progressed]
                st.cur = torch.where(chosen, drawn, st.cur)
                st.step = torch.where(chosen, st.steps[:, None], st.step)
                st.logp = torch.where(chosen, drawn_lp, st.logp)
                st.masked = masked = masked & ~chosen
                done = progressed & ~masked.any(1)  # blocks completed by this forward
            else:
                done = torch.zeros_like(st.storing)

            if storing_any:  # rows that just committed their block open the next one (a new page each)
                opening = st.storing
                st.stores += opening
                new = opening[:, None] & ((cache.lengths[:, None] + offs) < st.budget[:, None])
                fresh = torch.full_like(st.cur, pad_id).masked_fill_(new, mask_id)
                st.cur = torch.where(opening[:, None], fresh, st.cur)
                st.masked = st.masked | new
                st.step = st.step.masked_fill(opening[:, None], 0)
                st.logp = st.logp.masked_fill(opening[:, None], 0.0)
                kept = self._make_room(st, cache, queue, out, opening)
                if kept is not None:  # preempted rows are gone: re-index this forward's values
                    opening, done, pos, in_budget = opening[kept], done[kept], pos[kept], in_budget[kept]
                rows_open = opening.nonzero().squeeze(1)
                cache.open_block(rows_open, cache.lengths[rows_open] // bsz)
            st.storing = done
            storing_any = bool(done.any())
            self._record(st, cache)
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

    def _sample(self, states, sel, st: _LiveRows, pos, sp: SamplingParams, chunk: int, planner: bool):
        """Logits, draws, confidences and log-probs of the masked positions ``sel``, ``chunk`` positions at a time
        (the (positions × vocabulary) transients stay within ``transient_gb``); the planner's logits too."""
        lm = self.lm
        h = states[sel]
        rows, where = st.live[sel[0]], pos[sel]
        keys = None if sp.greedy else draw_keys(sp.seed, rows, st.steps[sel[0]] + 1, sel[1])
        parts = []
        for a in range(0, h.shape[0], chunk):
            b = a + chunk
            logits = lm.logits(h[a:b])
            if self.logits_processor is not None:
                logits = self.logits_processor(logits, rows[a:b], where[a:b])
            tok, c, lp = sample_tokens(logits, greedy=sp.greedy, temperature=sp.temperature, top_k=sp.top_k,
                                       top_p=sp.top_p, with_logprobs=True, keys=None if keys is None else keys[a:b])
            plan = lm.planner(h[a:b], planner_confidence(logits)) if planner else None
            parts.append((tok, c, lp, plan))
        tok, c, lp = (torch.cat([p[i] for p in parts]) for i in range(3))
        plan = torch.cat([p[3] for p in parts]) if planner else None
        return tok, c, lp, plan

    def _record(self, st: _LiveRows, cache) -> None:
        stats = self.stats
        stats.pages_used.append(cache.used_pages)
        if self.record_tokens:
            # private slots written (committed blocks and the current one, up to the budget), plus each shared
            # prompt once (rows sharing a prefill share its first page)
            held = (torch.minimum(cache.lengths + st.cur.shape[1], st.budget) - st.pfull).clamp(min=0).sum()
            if st.n:
                first = cache.table[: st.n, 0]
                _, inv = torch.unique(first, return_inverse=True)
                held = held + torch.zeros(int(inv.max()) + 1, dtype=torch.long, device=first.device).scatter_reduce_(
                    0, inv, st.pfull, reduce="amax").sum()
            stats.tokens_held.append(int(held))

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
