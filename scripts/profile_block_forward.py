"""Where the GPU time of one graph-shaped block forward goes: CUDA kernel time by kernel, from torch.profiler over
the eager run of the shape-static forward that `lrl.models.cuda_graphs` captures (a replay runs the same kernels).

    python scripts/profile_block_forward.py --shape sdar-8b --rows 1 --out outputs/gpu/profile_8b.json
    python scripts/profile_block_forward.py --shape tiny --device cpu --rows 2 --block-size 4 --prompt-len 8  # smoke

On CPU the same table lists operators by self CPU time (there are no kernels). Prints the table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import SHAPES, build  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sdar-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    from lrl.models.cuda_graphs import BlockForwardGraphs

    dev, bs, plen = torch.device(args.device), args.block_size, args.prompt_len
    cuda = dev.type == "cuda"
    lm = build(args.shape, dev, torch.bfloat16 if cuda else torch.float32, bs, "sdpa").eval()
    cache = lm.new_cache(args.rows, plen + bs)
    prompt = torch.randint(0, lm.hf_config.vocab_size - 1, (args.rows, plen), device=dev)
    lm.decode_attention = "dense"
    lm.forward_chunk(cache, prompt, block_size=bs, store=torch.full((args.rows,), plen, device=dev))
    runner = BlockForwardGraphs(lm, cache, block_size=bs, capture=False)
    block = torch.full((args.rows, bs), lm.bd.mask_token_id, device=dev)
    for _ in range(2):
        runner.forward(block)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            runner.forward(block)
        sync()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages():
        if cuda:
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            t = t if ev.device_type == torch.autograd.DeviceType.CUDA else 0
        else:
            t = ev.self_cpu_time_total
        if t > 0:
            per[ev.key][0] += t / args.repeats / 1e3
            per[ev.key][1] += ev.count // args.repeats
    rows = sorted(([k[:110], round(ms, 4), n] for k, (ms, n) in per.items()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    kernels = sum(r[2] for r in rows)
    res = {"shape": args.shape, "device": str(dev), "rows": args.rows, "ms_per_forward": round(total, 3),
           "calls_per_forward": kernels, "top": rows[: args.top]}
    print(f"{args.shape} rows {args.rows}: {total:.2f} ms of {'kernels' if cuda else 'operators'} per forward, "
          f"{kernels} {'kernels' if cuda else 'operator calls'}")
    for name, ms, n in rows[: args.top]:
        print(f"{ms:8.3f} ms {n:5d}x  {name}")
    if args.out:
        from lrl.atomic import atomic_write

        atomic_write(args.out, json.dumps(res, indent=2).encode())
    return res


if __name__ == "__main__":
    main()
