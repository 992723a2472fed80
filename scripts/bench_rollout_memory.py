"""Rollout KV memory and rows per forward: the paged, continuously batched engine against the chunked dense schedule.

A rollout of ``--groups`` prompt groups × ``--group-size`` samples with a long-tailed length distribution (most
responses stop early, a few run to ``--max-new-tokens``), decoded twice on the same prompts:

* ``paged``: `NativeEngine` as shipped: a page pool of ``--kv-gb`` (per-token bytes of ``--account``), groups
  admitted whenever rows and pages free up;
* ``chunked``: the schedule of the engine before pages: chunks of ``--max-rows`` rows run one after the other, each
  waiting for its longest row, over a dense cache of rows × (prompt + max_new_tokens) slots.

Lengths are scripted with a logits processor (the stop id forced at each row's drawn length, banned elsewhere) on
random weights, greedy, threshold 0 (every block in one forward), so both schedules decode exactly the same tokens
(checked). Per engine iteration it records rows in the forward, pages in use and the KV slots rows hold.

Two parts (``--part``):

* ``width``: the real SDAR-1.7B width (hidden 2048, 16 query / 8 KV heads × 128, vocabulary 151,936) with
  ``--layers`` layers, on this machine's CPU; KV bytes are those of its layers in ``--dtype``.
* ``scale``: the paper's schedule (16 × 32, 8192 new tokens, block 32) on a narrow model (the schedule does not
  depend on width); the KV bytes are accounted at ``--account`` (SDAR-8B: 36 layers × 8 KV heads × 128 × bf16 =
  147,456 B per token), so ``--kv-gb 20`` is the page count a 20 GB budget gives on an 8B rank.

    python scripts/bench_rollout_memory.py --part width --out docs/bench/rollout_memory/width_1p7b.json
    python scripts/bench_rollout_memory.py --part scale --out docs/bench/rollout_memory/scale_8b.json

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import build  # noqa: E402

from lrl.rollout import NativeEngine, SamplingParams  # noqa: E402

ACCOUNT = {"sdar-8b": 147_456, "sdar-1.7b": 114_688}  # KV bytes per token in bf16 (2 × layers × 8 × 128 × 2)


class _IdTokenizer:
    pad_token_id = 0
    eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def long_tail_lengths(n: int, max_new: int, *, median: float, sigma: float, runaway: float, seed: int) -> list[int]:
    """Response lengths: log-normal around ``median`` (clipped to [1, max_new]) and a ``runaway`` fraction that runs
    to ``max_new`` (the long tail of a reasoning rollout)."""
    g = torch.Generator().manual_seed(seed)
    body = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g)).round().clamp(1, max_new).long()
    run = torch.rand(n, generator=g) < runaway
    return torch.where(run, torch.full_like(body, max_new), body).tolist()


class ScriptedStops:
    """Logits processor: row r emits ``stop`` at generated position ``lengths[r] - 1`` and never before."""

    def __init__(self, lengths: list[int], prompt_lens: list[int], group_size: int, stop: int):
        self.end = torch.tensor([prompt_lens[r // group_size] + n - 1 for r, n in enumerate(lengths)])
        self.stop = stop

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        at = positions == self.end.to(rows.device)[rows]
        logits[:, self.stop] = torch.where(at, logits.new_tensor(1e4), logits.new_tensor(-1e4))
        return logits


def summarise(stats, max_rows: int) -> dict:
    """Peak pages against the tokens held at that moment, and how busy the forward's rows stayed."""
    s = stats.as_dict()
    tok, pages, rows = stats.tokens_held, stats.pages_used, stats.rows
    peak_i = max(range(len(pages)), key=pages.__getitem__)
    last_adm = max(stats.admitted_at, default=0)
    busy = [r / max_rows for r in rows[: max(last_adm, 1)]]
    ratios = [p * stats.page_size / t for p, t in zip(pages, tok) if t]
    return dict(iterations=len(rows), peak_pages=stats.peak_pages, tokens_held_at_peak=tok[peak_i],
                peak_slots_over_held=pages[peak_i] * stats.page_size / max(tok[peak_i], 1),
                max_slots_over_held=max(ratios, default=0.0), peak_tokens_held=max(tok, default=0),
                rows_busy_until_last_admission=dict(mean=sum(busy) / len(busy), min=min(busy)),
                last_admission_iteration=last_adm, admissions=len(stats.admitted_at),
                preempted_rows=stats.preempted_rows, prefills=stats.prefills,
                rows_per_iteration=rows, pages_per_iteration=pages, tokens_held_per_iteration=tok,
                page_size=s["page_size"], pool_pages=s["pool_pages"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["width", "scale"], default="width")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: width 64, scale 8192")
    ap.add_argument("--block-size", type=int, default=None, help="default: width 4, scale 32")
    ap.add_argument("--max-rows", type=int, default=None, help="rows per forward; default: width 128, scale 512")
    ap.add_argument("--kv-gb", type=float, default=None, help="paged KV budget, GB of --account bytes (scale: 20)")
    ap.add_argument("--account", choices=sorted(ACCOUNT), default="sdar-8b", help="scale: per-token KV bytes")
    ap.add_argument("--layers", type=int, default=2, help="width: decoder layers of the 1.7B-width model")
    ap.add_argument("--dtype", default="float32", help="width: model dtype on the CPU")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[60, 200], help="prompt lengths drawn in [lo, hi]")
    ap.add_argument("--median", type=float, default=None, help="median response length (width 16, scale 300)")
    ap.add_argument("--sigma", type=float, default=0.6, help="log-normal spread of response lengths")
    ap.add_argument("--runaway", type=float, default=0.02, help="fraction of responses running to the budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    width = args.part == "width"
    max_new = args.max_new_tokens or (64 if width else 8192)
    bsz = args.block_size or (4 if width else 32)
    max_rows = args.max_rows or (128 if width else 512)
    median = args.median or (16 if width else 300)
    if width:
        lm = build("sdar-1.7b", torch.device("cpu"), getattr(torch, args.dtype), bsz, "sdpa",
                   num_hidden_layers=args.layers)
        account = lm.kv_bytes_per_token()
    else:
        lm = build("tiny", torch.device("cpu"), torch.float32, bsz, "sdpa", num_hidden_layers=1, hidden_size=32,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64)
        account = ACCOUNT[args.account]
    lm.eval()
    vocab = lm.hf_config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    lo, hi = args.prompt_len
    plens = torch.randint(lo, hi + 1, (args.groups,), generator=g).tolist()
    prompts = [torch.randint(1, vocab - 1, (n,), generator=g).tolist() for n in plens]
    lengths = long_tail_lengths(args.groups * args.group_size, max_new, median=median, sigma=args.sigma,
                                runaway=args.runaway, seed=args.seed + 1)
    stop = 0
    sp = SamplingParams(block_size=bsz, threshold=0.0, greedy=True, max_new_tokens=max_new,
                        samples_per_prompt=args.group_size, stop_token_ids=(stop,))
    scale = lm.kv_bytes_per_token() / account  # this model's KV bytes per accounted byte
    kv_gb = args.kv_gb if args.kv_gb is not None else (None if width else 20.0)
    result = dict(part=args.part, groups=args.groups, group_size=args.group_size, max_new_tokens=max_new,
                  block_size=bsz, max_rows=max_rows, kv_bytes_per_token=account, kv_gb=kv_gb,
                  response_lengths=dict(mean=sum(lengths) / len(lengths), median=sorted(lengths)[len(lengths) // 2],
                                        at_budget=sum(n == max_new for n in lengths)),
                  prompt_lens=plens, command=" ".join(sys.argv))
    outs = {}
    for name, kw in (("paged", dict(kv_cache_gb=None if kv_gb is None else kv_gb * scale)),
                     ("chunked", dict(kv_cache_gb=None, continuous=False))):
        eng = NativeEngine(lm, _IdTokenizer(), max_rows=max_rows, record_tokens=True,
                           logits_processor=ScriptedStops(lengths, plens, args.group_size, stop), **kw)
        t0 = time.perf_counter()
        outs[name] = eng.generate(prompts, sp)
        wall = time.perf_counter() - t0
        r = summarise(eng.stats, max_rows)
        r["wall_s"] = wall
        r["pool_gb"] = r["pool_pages"] * bsz * account / 1e9  # the pool's bytes at the accounted width
        r["peak_kv_gb"] = r["peak_pages"] * bsz * account / 1e9
        r["tokens_held_at_peak_gb"] = r["tokens_held_at_peak"] * account / 1e9
        result[name] = r
        print(f"{name}: {r['iterations']} iterations, {wall:.1f} s, pool {r['pool_gb']:.3g} GB, peak KV "
              f"{r['peak_kv_gb']:.3g} GB for {r['tokens_held_at_peak_gb']:.3g} GB held "
              f"(×{r['peak_slots_over_held']:.3f}), rows busy until last admission "
              f"{r['rows_busy_until_last_admission']['mean']:.2f} (min "
              f"{r['rows_busy_until_last_admission']['min']:.2f}), preempted {r['preempted_rows']}", file=sys.stderr)
    a, b = outs["paged"], outs["chunked"]
    result["same_tokens"] = a.response_ids == b.response_ids and a.step_maps == b.step_maps
    result["lengths_as_scripted"] = [len(x) for x in a.response_ids] == lengths
    dense_slots = min(len(lengths), max_rows) * max(-(-(p + max_new) // bsz) * bsz for p in plens)
    result["dense_cache_gb"] = dense_slots * account / 1e9  # the engine before pages, one chunk of max_rows rows
    text = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k not in ("paged", "chunked", "prompt_lens")}
                     | {n: {k: v for k, v in result[n].items() if not k.endswith("_per_iteration")}
                        for n in ("paged", "chunked")}))


if __name__ == "__main__":
    main()
