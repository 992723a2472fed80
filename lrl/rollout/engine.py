"""The native block-diffusion rollout engine: batched, KV-cached, records step maps and TPF (spec §2).

Many prompts of different lengths decode at once. Each row advances on its own: blocks are aligned to absolute
positions of the row (the first generation block may hold the prompt tail), a row's KV cache holds its committed
blocks, and each engine iteration runs ONE batched forward over the rows still generating. In that forward a row
either denoises its current block (sample, score confidence, unmask, step += 1) or, once the block has no masks
left and generation goes on, re-encodes it with its final tokens and commits it (the store pass). Finished rows
leave the batch, so they stop costing compute. The G samples of a prompt share its prefill (the cache rows are
copied after it). A finished response needs no store pass, so none is run for its last block.

Counting (spec §2.5): ``step_map[i]`` is the 1-based denoising forward that unmasked generated token i; store
passes are not counted. ``num_forwards`` = number of distinct step ids among the returned tokens (the reference's
``len(set(step_map))``); TPF = returned tokens ÷ num_forwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from lrl.models.block_lm import BlockDiffusionLM
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch, SamplingParams
from lrl.rollout.unmasking import sample_tokens, select_unmask

_PHASE_DENOISE, _PHASE_STORE = 0, 1


class NativeEngine(RolloutGenerator):
    """In-process rollout generator over a `BlockDiffusionLM`.

    Args:
        lm: the block-diffusion model (its weights are the policy's; see `update_weights`).
        tokenizer: used to encode string prompts and decode responses.
        max_rows: most rows (prompts × samples) decoded at once; larger requests run in chunks of whole groups.
        progress: show a progress bar (off by default inside training).
    """

    def __init__(self, lm: BlockDiffusionLM, tokenizer, *, max_rows: int = 512, progress: bool = False):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.lm = lm
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.progress = progress
        self.weight_version = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ interface
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Copy tensors into the engine's model in place (no reload from disk); names are HF parameter names."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        own = dict(self.lm.model.named_parameters())
        own.update(dict(self.lm.model.named_buffers()))
        missing = []
        with torch.no_grad():
            for name, tensor in items:
                name = name.removeprefix("model.") if name not in own and name.startswith("model.model.") else name
                if name not in own:
                    missing.append(name)
                    continue
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        if missing:
            raise KeyError(f"update_weights: unknown parameter names {missing[:5]}{'…' if len(missing) > 5 else ''}")
        self.weight_version = self.weight_version + 1 if version is None else int(version)

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
        bar = _progress(len(ids) * g, self.progress)
        parts = []
        for start in range(0, len(ids), per_chunk):
            parts.append(self._generate_chunk(ids[start : start + per_chunk], sampling, gen, bar))
        if bar is not None:
            bar.close()
        batch = RolloutBatch.concat(parts)
        batch.weight_version = self.weight_version
        return batch

    # ------------------------------------------------------------------ decoding
    def _generate_chunk(self, prompts: list[list[int]], sp: SamplingParams, gen, bar) -> RolloutBatch:
        lm, dev, bsz = self.lm, self.lm.device, sp.block_size
        mask_id, g = lm.bd.mask_token_id, sp.samples_per_prompt
        n = len(prompts)
        plen = torch.tensor([len(p) for p in prompts], device=dev)
        full = plen // bsz * bsz
        slots = int(((plen + sp.max_new_tokens + bsz - 1) // bsz * bsz).max())
        cache = lm.new_cache(n, slots)
        width = int(full.max())
        if width > 0:  # prefill: every full prompt block, block-causal, committed at once
            chunk = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
            for i, p in enumerate(prompts):
                chunk[i, : int(full[i])] = torch.tensor(p[: int(full[i])], device=dev)
            valid = torch.arange(width, device=dev)[None] < full[:, None]
            lm.forward_chunk(cache, chunk, block_size=bsz, key_valid=valid, store=full)
        cache.repeat_interleave(g)

        rows = n * g
        tokens = torch.full((rows, slots), self.pad_id, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i * g : (i + 1) * g, : len(p)] = torch.tensor(p, device=dev)
        plen_r = plen.repeat_interleave(g)
        budget = plen_r + sp.max_new_tokens  # first absolute position that may not be generated
        step_map = torch.zeros(rows, slots, dtype=torch.long, device=dev)
        steps = torch.zeros(rows, dtype=torch.long, device=dev)
        stores = torch.zeros(rows, dtype=torch.long, device=dev)
        phase = torch.full((rows,), _PHASE_DENOISE, dtype=torch.long, device=dev)
        active = torch.ones(rows, dtype=torch.bool, device=dev)
        end = torch.zeros(rows, dtype=torch.long, device=dev)  # exclusive end of the returned response
        finish = [""] * rows
        stop_ids = torch.tensor(sorted(set(sp.stop_token_ids)), dtype=torch.long, device=dev)
        offs = torch.arange(bsz, device=dev)
        is_masked = torch.zeros(rows, slots, dtype=torch.bool, device=dev)
        self._open_block(tokens, is_masked, cache.lengths, plen_r, budget, offs, mask_id, torch.arange(rows, device=dev))
        k = sp.tokens_per_step()

        while bool(active.any()):
            act = active.nonzero().squeeze(1)
            starts = cache.lengths[act]
            pos = starts[:, None] + offs  # (A, B) absolute positions of the current blocks
            block = tokens[act[:, None], pos.clamp(max=slots - 1)]
            key_valid = pos < budget[act, None]
            storing = phase[act] == _PHASE_STORE
            store = torch.where(storing, torch.full_like(starts, bsz), torch.zeros_like(starts))
            logits = lm.forward_chunk(cache, block, rows=act, block_size=bsz, key_valid=key_valid, store=store)
            stores[act[storing]] += 1

            # rows that just committed their block open the next one
            if bool(storing.any()):
                phase[act[storing]] = _PHASE_DENOISE
                self._open_block(tokens, is_masked, cache.lengths, plen_r, budget, offs, mask_id, act[storing])

            den = ~storing
            if not bool(den.any()):
                continue
            d_rows, d_pos, d_logits = act[den], pos[den], logits[den]
            d_idx = (d_rows[:, None], d_pos.clamp(max=slots - 1))
            masked = is_masked[d_idx]
            sel = masked.nonzero(as_tuple=True)
            conf = torch.zeros(masked.shape, dtype=torch.float32, device=dev)
            drawn = torch.zeros(masked.shape, dtype=torch.long, device=dev)
            if sel[0].numel():
                tok, c = sample_tokens(d_logits[sel], greedy=sp.greedy, temperature=sp.temperature, top_k=sp.top_k,
                                       top_p=sp.top_p, generator=gen)
                drawn[sel], conf[sel] = tok, c
            chosen = select_unmask(conf, masked, strategy=sp.remasking_strategy, threshold=sp.threshold, k=k)
            progressed = chosen.any(1)
            steps[d_rows] += progressed.long()
            new_tok = torch.where(chosen, drawn, block[den])
            tokens[d_idx] = new_tok
            step_map[d_idx] = torch.where(chosen, steps[d_rows, None], step_map[d_idx])
            is_masked[d_idx] = masked & ~chosen

            done_block = ~(masked & ~chosen).any(1)
            for j in done_block.nonzero().flatten().tolist():
                r = int(d_rows[j])
                first, last = int(d_pos[j, 0]), int(d_pos[j, -1]) + 1
                gen_from = max(first, int(plen_r[r]))
                seg = tokens[r, gen_from:last]
                hits = torch.isin(seg, stop_ids).nonzero() if stop_ids.numel() else seg.new_zeros((0, 1))
                cap = int(budget[r])
                if hits.numel():
                    stop_at = gen_from + int(hits[0])
                    end[r] = stop_at + 1 if sp.eos_policy == "truncate" else min(last, cap)
                    finish[r] = "stop"
                elif last >= cap:
                    end[r] = cap
                    finish[r] = "length"
                else:
                    phase[r] = _PHASE_STORE
                    continue
                active[r] = False
                if bar is not None:
                    bar.update(1)
        return self._collect(prompts, g, tokens, step_map, plen_r, end, stores, finish)

    @staticmethod
    def _open_block(tokens, is_masked, lengths, plen, budget, offs, mask_id, rows) -> None:
        """Fill the block at ``lengths[rows]`` with MASK where a token is still to be generated."""
        pos = lengths[rows, None] + offs
        gen = (pos >= plen[rows, None]) & (pos < budget[rows, None])
        pos = pos.clamp(max=tokens.shape[1] - 1)
        cur = tokens[rows[:, None], pos]
        tokens[rows[:, None], pos] = torch.where(gen, torch.full_like(cur, mask_id), cur)
        is_masked[rows[:, None], pos] = gen

    def _collect(self, prompts, g, tokens, step_map, plen, end, stores, finish) -> RolloutBatch:
        resp_ids, smaps, nfwd = [], [], []
        for r in range(tokens.shape[0]):
            a, b = int(plen[r]), int(end[r])
            resp_ids.append(tokens[r, a:b].tolist())
            sm = step_map[r, a:b].tolist()
            smaps.append(sm)
            nfwd.append(len(set(sm)))
        texts = self.tokenizer.batch_decode(resp_ids, skip_special_tokens=True)
        return RolloutBatch(
            prompt_ids=[list(prompts[r // g]) for r in range(len(resp_ids))],
            response_ids=resp_ids,
            texts=texts,
            step_maps=smaps,
            num_forwards=torch.tensor(nfwd, dtype=torch.long),
            num_store_passes=stores.cpu(),
            finish_reasons=finish,
            group_index=torch.arange(len(prompts)).repeat_interleave(g),
            weight_version=self.weight_version,
        )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rollout", unit="resp", leave=False)
