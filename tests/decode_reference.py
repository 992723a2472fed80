"""The slow, uncached reference decoder the engine and the SGLang plugin are checked against (spec §2)."""

from __future__ import annotations

import torch

from lrl.rollout import SamplingParams, sample_tokens, select_unmask
from lrl.rollout.unmasking import draw_keys


def reference_decode(lm, prompt: list[int], sp: SamplingParams, pad_id: int, row: int = 0,
                     generator: torch.Generator | None = None, logprobs: list[float] | None = None):
    """Every denoising step recomputes the whole sequence with ``full_logits``.

    Same rules as the engine: blocks aligned to absolute positions, the shared sample/select functions, stop checks
    on complete blocks, nothing generated past the budget. Sampled draws are keyed by (seed, ``row`` — the request
    row, prompt i × G + sample j —, step, block offset) as the native engine keys them, or, with ``generator``,
    drawn from it in position order (the SGLang plugin's per-rank stream). Returns (ids, step map, finish reason);
    ``logprobs``, when given, is filled with the returned tokens' sampling log-probs.
    """
    bsz, plen = sp.block_size, len(prompt)
    budget = plen + sp.max_new_tokens
    total = -(-budget // bsz) * bsz
    seq = torch.full((total,), pad_id, dtype=torch.long)
    seq[:plen] = torch.tensor(prompt)
    masked = torch.zeros(total, dtype=torch.bool)
    masked[plen:budget] = True
    seq[masked] = lm.bd.mask_token_id
    steps, step = torch.zeros(total, dtype=torch.long), 0
    lps = torch.zeros(total)
    for lo in range(plen // bsz * bsz, total, bsz):
        hi = lo + bsz
        while masked[lo:hi].any():
            logits = lm.full_logits(seq[None, :hi], torch.tensor([min(hi, budget)]), bsz)[0, lo:hi]
            m = masked[lo:hi]
            at = m.nonzero().squeeze(1)
            keys = None
            if not sp.greedy and generator is None:
                keys = draw_keys(sp.seed, torch.full_like(at, row), torch.full_like(at, step + 1), at)
            tok, c, lp = sample_tokens(logits[m], greedy=sp.greedy, temperature=sp.temperature, top_k=sp.top_k,
                                       top_p=sp.top_p, generator=generator, with_logprobs=True, keys=keys)
            conf, drawn, drawn_lp = torch.zeros(bsz), seq[lo:hi].clone(), torch.zeros(bsz)
            conf[m], drawn[m], drawn_lp[m] = c, tok, lp
            chosen = select_unmask(conf[None], m[None], strategy=sp.remasking_strategy, threshold=sp.threshold,
                                   k=sp.tokens_per_step())[0]
            step += 1
            seq[lo:hi][chosen] = drawn[chosen]
            lps[lo:hi][chosen] = drawn_lp[chosen]
            steps[lo:hi][chosen] = step
            masked[lo:hi] &= ~chosen
        gen_from = max(lo, plen)
        hits = [i for i, t in enumerate(seq[gen_from:min(hi, budget)].tolist()) if t in sp.stop_token_ids]
        end, why = None, None
        if hits:
            end, why = (gen_from + hits[0] + 1 if sp.eos_policy == "truncate" else min(hi, budget)), "stop"
        elif hi >= budget:
            end, why = budget, "length"
        if end is not None:
            if logprobs is not None:
                logprobs.extend(lps[plen:end].tolist())
            return seq[plen:end].tolist(), steps[plen:end].tolist(), why
    raise AssertionError("unreachable")
