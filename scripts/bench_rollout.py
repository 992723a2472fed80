"""Benchmark the native rollout engine against a per-sequence decoder with SDAR ``generate.py`` semantics.

Both decoders run the same randomly initialised tiny model on the same prompts, with greedy decoding,
``low_confidence_dynamic`` unmasking, the same threshold and block size, so they must produce identical tokens and
identical TPF. The baseline decodes one sequence at a time: prefill of the full prompt blocks, then per block a
denoising forward per step against the KV cache and one store pass once the block has no mask left (the loop of
SDAR's ``block_diffusion_generate``, which also stores the last block; the engine skips that one), written here with
the model's primitives ``new_cache``/``forward_chunk``. The engine decodes all prompts at once, one batched forward
per iteration.

Usage::

    python scripts/bench_rollout.py --num-prompts 64 --max-new-tokens 64 --block-size 4 --threshold 0.9 --threads 1

``--threads 1`` gives stable figures on a shared machine (busy cores make multi-threaded OpenMP/MKL spin); leave it
out to use torch's default. "model calls" counts every ``forward_chunk`` (prefill, denoising steps, store passes):
the engine makes one per iteration for all rows, the baseline one per sequence and step.

Prints a table and, as its last line, one JSON object with the measured figures (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

from lrl.models import build_char_tokenizer, build_tiny_model
from lrl.rollout import NativeEngine, SamplingParams


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """Synthetic arithmetic prompts of varying length (operands of 1–6 digits, optional preamble)."""
    rng = random.Random(seed)
    preambles = ["", "Solve. ", "Compute the sum. ", "Answer with a number only. "]
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 10 ** rng.randint(1, 6)), rng.randint(0, 10 ** rng.randint(1, 6))
        out.append(f"{rng.choice(preambles)}Q: {a}+{b}=?\nA: ")
    return out


def num_transfer_tokens(masked: int, steps: int) -> list[int]:
    """SDAR's per-step token schedule: the block's masked count split evenly over the steps, remainder first."""
    base, extra = divmod(masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.no_grad()
def baseline_generate(lm, prompt: list[int], sp: SamplingParams, pad_id: int) -> tuple[list[int], list[int]]:
    """Decode ONE sequence with the loop of SDAR ``generate.py`` (greedy, low_confidence_dynamic).

    Prefill the full prompt blocks; then per block, up to ``block_size`` denoising steps, each unmasking the masked
    positions whose confidence reaches the threshold, or the top-``num_transfer_tokens[step]`` ones when too few do
    (SDAR compares with ``>``; ``>=`` here as lmdeploy does, identical except at exact ties); once the block has no
    mask left, a store pass commits its K/V, and decoding stops after a block that holds a stop token. Masked
    positions are tracked apart from the token ids so that a drawn MASK id cannot be mistaken for a mask.

    Returns:
        (response ids up to and including the first stop token, their 1-based denoising step ids).
    """
    bsz, mask_id = sp.block_size, lm.bd.mask_token_id
    plen = len(prompt)
    budget = plen + sp.max_new_tokens
    total = -(-budget // bsz) * bsz
    x = torch.full((1, total), pad_id, dtype=torch.long)
    x[0, :plen] = torch.tensor(prompt)
    masked = torch.zeros(1, total, dtype=torch.bool)
    masked[0, plen:budget] = True
    x[masked] = mask_id
    step_map = torch.zeros(1, total, dtype=torch.long)
    cache = lm.new_cache(1, total)
    prefill = plen // bsz * bsz
    if prefill:
        lm.forward_chunk(cache, x[:, :prefill], block_size=bsz, store=torch.tensor([prefill]))
    stop = torch.tensor(sp.stop_token_ids, dtype=torch.long)
    step, end = 0, budget
    for lo in range(prefill, total, bsz):
        hi = lo + bsz
        cur_x, cur_masked, cur_steps = x[:, lo:hi], masked[:, lo:hi], step_map[:, lo:hi]  # views into x, masked
        key_valid = torch.arange(lo, hi)[None] < budget
        schedule = num_transfer_tokens(int(cur_masked.sum()), bsz)
        for s in range(bsz + 1):
            if cur_masked.sum() == 0:  # block complete: store pass, then next block
                lm.forward_chunk(cache, cur_x, block_size=bsz, key_valid=key_valid, store=torch.tensor([bsz]))
                break
            logits = lm.forward_chunk(cache, cur_x, block_size=bsz, key_valid=key_valid)
            x0_p, x0 = logits.float().softmax(-1).max(-1)
            confidence = torch.where(cur_masked, x0_p, -torch.inf)
            transfer = torch.zeros_like(cur_masked)
            for j in range(confidence.shape[0]):
                high = confidence[j] >= sp.threshold
                if high.sum() >= schedule[s]:
                    transfer[j] = high
                else:
                    transfer[j, torch.topk(confidence[j], schedule[s]).indices] = True
            step += 1
            cur_x[transfer] = x0[transfer]
            cur_steps[transfer] = step
            cur_masked &= ~transfer
        gen_from = max(lo, plen)
        hits = torch.isin(x[0, gen_from:min(hi, budget)], stop).nonzero() if len(stop) else []
        if len(hits):
            end = gen_from + int(hits[0]) + 1
            break
    return x[0, plen:end].tolist(), step_map[0, plen:end].tolist()


class _CountForwards:
    """Wraps ``lm.forward_chunk`` to count model forwards (denoising steps, store passes and prefills)."""

    def __init__(self, lm):
        self.lm, self.real, self.n = lm, lm.forward_chunk, 0

    def __enter__(self):
        def counted(*a, **kw):
            self.n += 1
            return self.real(*a, **kw)

        self.lm.forward_chunk = counted
        return self

    def __exit__(self, *exc):
        del self.lm.forward_chunk  # back to the bound method


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="model init seed")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="time each decoder this many times (interleaved); best")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at EOS (always decode the full budget)")
    ap.add_argument("--profile", type=str, default="", help="write a cProfile dump of one engine run here")
    ap.add_argument("--out", type=str, default="", help="also write the JSON result to this file (e.g. outputs/…)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = build_char_tokenizer()
    heads = max(1, args.hidden_size // 32)
    lm = build_tiny_model(tok, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=heads,
                          num_kv_heads=max(1, heads // 2), block_size=args.block_size, seed=args.seed).eval()
    prompts = make_prompts(args.num_prompts)
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    sp = SamplingParams(block_size=args.block_size, remasking_strategy="low_confidence_dynamic",
                        threshold=args.threshold, greedy=True, max_new_tokens=args.max_new_tokens,
                        stop_token_ids=() if args.no_stop else (tok.eos_token_id,))
    engine = NativeEngine(lm, tok, max_rows=max(1, args.num_prompts))
    engine.generate(prompts[:2], sp)  # warm-up (allocator, lazy imports)
    baseline_generate(lm, ids[0], sp, engine.pad_id)

    eng_runs, base_runs = [], []
    for _ in range(max(1, args.repeats)):  # interleaved, so both see the same machine load
        with _CountForwards(lm) as ce:
            batch, w, c = _timed(lambda: engine.generate(prompts, sp))
        eng_runs.append((w, c, ce.n))
        with _CountForwards(lm) as cb:
            base, w, c = _timed(lambda: [baseline_generate(lm, p, sp, engine.pad_id) for p in ids])
        base_runs.append((w, c, cb.n))
    t_engine, c_engine, n_engine = min(eng_runs)
    t_base, c_base, n_base = min(base_runs)
    if args.profile:
        import cProfile

        cProfile.runctx("engine.generate(prompts, sp)", globals(), {"engine": engine, "prompts": prompts, "sp": sp},
                        args.profile)

    e_tokens = sum(len(r) for r in batch.response_ids)
    b_tokens = sum(len(r) for r, _ in base)
    e_fwd = int(batch.num_forwards.sum())
    b_fwd = sum(len(set(s)) for _, s in base)
    same_tokens = all(r == b for r, (b, _) in zip(batch.response_ids, base))
    same_steps = all(s == b for s, (_, b) in zip(batch.step_maps, base))
    result = {
        "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "block_size": args.block_size,
        "threshold": args.threshold, "hidden_size": args.hidden_size, "layers": args.layers,
        "threads": torch.get_num_threads(), "repeats": max(1, args.repeats),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "engine_s": round(t_engine, 4), "baseline_s": round(t_base, 4),
        "engine_cpu_s": round(c_engine, 4), "baseline_cpu_s": round(c_base, 4),
        "engine_model_calls": n_engine, "baseline_model_calls": n_base,
        "engine_ms_per_call": round(t_engine / n_engine * 1e3, 3),
        "baseline_ms_per_call": round(t_base / n_base * 1e3, 3),
        "engine_tokens": e_tokens, "baseline_tokens": b_tokens,
        "engine_tokens_per_s": round(e_tokens / t_engine, 1), "baseline_tokens_per_s": round(b_tokens / t_base, 1),
        "speedup": round((e_tokens / t_engine) / (b_tokens / t_base), 2),
        "speedup_cpu_time": round((e_tokens / c_engine) / (b_tokens / c_base), 2),
        "engine_tpf": round(e_tokens / max(e_fwd, 1), 4), "baseline_tpf": round(b_tokens / max(b_fwd, 1), 4),
        "identical_tokens": same_tokens, "identical_step_maps": same_steps,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{'decoder':<9} {'wall s':>8} {'cpu s':>8} {'tokens':>7} {'tok/s':>9} {'TPF':>6} {'model calls':>12} "
          f"{'ms/call':>8}")
    for name, t, c, n, tokens, tpf in (("engine", t_engine, c_engine, n_engine, e_tokens, result["engine_tpf"]),
                                       ("baseline", t_base, c_base, n_base, b_tokens, result["baseline_tpf"])):
        print(f"{name:<9} {t:>8.3f} {c:>8.3f} {tokens:>7d} {tokens / t:>9.1f} {tpf:>6.3f} {n:>12d} "
              f"{t / n * 1e3:>8.3f}")
    print(f"speedup {result['speedup']}x (cpu time: {result['speedup_cpu_time']}x); identical tokens: {same_tokens}; "
          f"identical step maps: {same_steps}; TPF equal: {result['engine_tpf'] == result['baseline_tpf']}; "
          f"threads {result['threads']}, load average {result['load_avg_1m']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
