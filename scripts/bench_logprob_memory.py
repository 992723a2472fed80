"""Peak memory and time of the training log-prob pass (forward + backward) at the real SDAR/Qwen3 vocabulary:
``plain`` (all (targets × 151,936) logits at once, the path before `lrl.algorithms.token_logprobs`) against
``chunked`` (what `response_logprobs` runs now).

    python scripts/bench_logprob_memory.py --device cpu --hidden 64 --layers 2 --response 1024 2048
    python scripts/bench_logprob_memory.py --device cuda --shape sdar-8b --dtype bfloat16 --response 768

One packed row: a prompt plus a response whose tokens are all targets (the single-pass estimator; the trajectory
estimator's rounds add copies but the same number of targets). Each (method, length) runs in a fresh subprocess:
on CPU the figure is the rise of the process's peak RSS (``ru_maxrss``) over its level after the model was built,
on CUDA ``torch.cuda.max_memory_allocated`` above the level before the step. Random weights (memory and time do
not depend on them); nothing is downloaded. Prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VOCAB = 151936


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build(args):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
    from bench_forward import SHAPES, build

    if args.shape == "custom":
        SHAPES["custom"] = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=args.hidden // 4, intermediate_size=3 * args.hidden,
                                vocab_size=VOCAB)
    return build(args.shape, torch.device(args.device), getattr(torch, args.dtype), args.block_size, "sdpa")


def measure(args) -> dict:
    """One (method, response length) measurement in this process."""
    from lrl.algorithms.logprobs import Scoring, response_logprobs

    device = torch.device(args.device)
    torch.manual_seed(0)
    lm = _build(args).train()
    prompt = torch.randint(0, VOCAB - 2, (args.prompt,)).tolist()
    response = torch.randint(0, VOCAB - 2, (args.response,)).tolist()
    steps = [1] * args.response
    bs = args.block_size

    def plain():
        ids = torch.tensor([prompt + response], device=device)
        noisy = torch.zeros(1, 1, ids.shape[1], dtype=torch.bool, device=device)
        noisy[0, 0, len(prompt):] = True
        logits = lm(ids, noisy, torch.tensor([ids.shape[1]], device=device), bs).float()
        tok = ids[0, len(prompt):]
        lse = logits.logsumexp(-1)
        return logits.gather(-1, tok[:, None]).squeeze(-1) - lse

    def chunked():
        return response_logprobs(lm, [prompt], [response], [steps], Scoring("single_pass", rows_per_forward=1))[0]

    fn = plain if args.method == "plain" else chunked

    def step():
        lm.zero_grad(set_to_none=True)
        fn().sum().backward()

    if device.type == "cuda":
        step()  # warm-up (allocator, kernels), then measure the peak of one step from here
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:  # ru_maxrss is a high-water mark: no warm-up step, measure the first one from the built model
        base = _rss_mib()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    peak = ((torch.cuda.max_memory_allocated(device) - base) / 2**20) if device.type == "cuda" else _rss_mib() - base
    if device.type == "cpu":  # the first step paid one-off costs: time a second one
        t0 = time.perf_counter()
        step()
        ms = (time.perf_counter() - t0) * 1e3
    return {"method": args.method, "response": args.response, "targets": args.response, "peak_extra_mib":
            round(peak, 1), "fwd_bwd_ms": round(ms, 1), "shape": args.shape, "hidden": args.hidden,
            "layers": args.layers, "device": args.device, "dtype": args.dtype,
            "logits_mib_if_materialised": round(args.response * VOCAB * 4 / 2**20, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shape", default="custom", help="custom (--hidden/--layers) or a bench_forward.py shape")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["plain", "chunked"], choices=["plain", "chunked"])
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # one measurement (subprocess mode)
    args = ap.parse_args(argv)
    if args.method is not None:
        args.response = args.response[0]
        print(json.dumps(measure(args)))
        return []
    rows = []
    for length in args.response:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--method", method, "--response", str(length), "--device", args.device,
                   "--dtype", args.dtype, "--shape", args.shape, "--hidden", str(args.hidden), "--layers",
                   str(args.layers), "--prompt", str(args.prompt), "--block-size", str(args.block_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(out, flush=True)
    print("\n| method | targets | peak extra MiB | fwd+bwd ms | (targets × V) float32 logits MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['targets']} | {r['peak_extra_mib']} | {r['fwd_bwd_ms']} | "
              f"{r['logits_mib_if_materialised']} |")
    return rows


if __name__ == "__main__":
    main()
