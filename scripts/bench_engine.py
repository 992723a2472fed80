"""The native engine against the card's floors: ms per block forward at several batch sizes next to the weight-read
floor and the FLOP floor, and engine tokens/s at TPF 1 and at a fixed TPF (static strategy), random weights.

    python scripts/bench_engine.py --shape sdar-8b --device cuda --dtype bfloat16 --out outputs/bench/engine_8b.json
    python scripts/bench_engine.py --shape tiny --device cpu --dtype float32 --batches 1 2   # smoke run

Floors (per block forward of ``rows × block_size`` tokens):
* weight read: bytes of every weight a forward reads (all parameters except the input embedding table, of which
  only the looked-up rows are read) ÷ ``--bandwidth-gbs`` (H200: 4800 GB/s);
* FLOPs: 2 × those parameters × tokens ÷ ``--peak-tflops`` (H200 dense bf16: 989); attention FLOPs are left out,
  so the floor is a little optimistic for long caches.
A forward cannot be faster than the larger of the two. ``mfu`` is the FLOP floor ÷ the measured time.

Engine tokens/s: ``rows`` prompts of ``--prompt-len`` tokens decode ``--max-new-tokens`` tokens with the static
strategy (``block_size / tpf`` denoising steps per block, so every block takes exactly that many forwards; random
weights cannot give a realistic dynamic TPF), no stop tokens, with ``ms_per_forward`` per engine iteration.
``--cuda-graphs`` adds the CUDA-graph block forward (`lrl.models.cuda_graphs`) and engine runs with
``NativeEngine(cuda_graphs=True)``. Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import SHAPES, build, timed  # noqa: E402


class _IdTokenizer:
    """Prompts are given as ids and response texts are not needed: the engine only reads these attributes."""

    pad_token_id = 0
    eos_token_id = 0

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def floors(lm, rows: int, block_size: int, bandwidth_gbs: float, peak_tflops: float) -> dict:
    """Weight-read and FLOP floors (ms) of one block forward; see the module docstring."""
    embed = lm.model.get_input_embeddings().weight
    read = [p for p in lm.parameters() if p is not embed]
    weight_bytes = sum(p.numel() * p.element_size() for p in read)
    matmul_params = sum(p.numel() for p in read)
    tokens = rows * block_size
    return {
        "weight_bytes": weight_bytes,
        "weight_read_floor_ms": weight_bytes / (bandwidth_gbs * 1e9) * 1e3,
        "flop_floor_ms": 2 * matmul_params * tokens / (peak_tflops * 1e12) * 1e3,
    }


def block_forward_ms(lm, rows: int, plen: int, bs: int, device, warmup: int, repeats: int, mixed: bool = False,
                     graphs: bool = False):
    """Median ms of one block forward over ``rows`` rows with ``plen`` cached tokens each (``mixed``: cache
    lengths spread evenly over whole blocks from bs to plen, the RL case where rows sit at different positions;
    ``graphs``: the CUDA-graph replay of `lrl.models.cuda_graphs`, capture excluded by the warm-up)."""
    vocab = lm.hf_config.vocab_size
    g = torch.Generator(device=device).manual_seed(rows)
    prompt = torch.randint(0, vocab - 1, (rows, plen), device=device, generator=g)
    cache = lm.new_cache(rows, plen + bs)
    full = torch.full((rows,), plen, device=device)
    if mixed and plen > bs:
        full = (bs + torch.arange(rows, device=device) * (plen - bs) // max(rows - 1, 1)) // bs * bs
    kernel, lm.decode_attention = lm.decode_attention, "dense"  # the same prefill for every kernel
    valid = torch.arange(plen, device=device)[None] < full[:, None]
    lm.forward_chunk(cache, prompt, block_size=bs, key_valid=valid, store=full)
    lm.decode_attention = kernel
    block = torch.full((rows, bs), lm.bd.mask_token_id, device=device)
    if graphs:
        from lrl.models.cuda_graphs import BlockForwardGraphs

        runner = BlockForwardGraphs(lm, cache, block_size=bs)
        return timed(lambda: runner.forward(block), device, max(warmup, 1), repeats)
    return timed(lambda: lm.forward_chunk(cache, block, block_size=bs), device, warmup, repeats)


def engine_tokens_per_s(lm, rows: int, plen: int, bs: int, max_new: int, tpf: int, device,
                        cuda_graphs: bool = False) -> dict:
    from lrl.rollout import NativeEngine, SamplingParams

    vocab = lm.hf_config.vocab_size
    g = torch.Generator().manual_seed(rows + tpf)
    prompts = torch.randint(1, vocab - 1, (rows, plen), generator=g).tolist()
    sp = SamplingParams(block_size=bs, remasking_strategy="low_confidence_static", denoising_steps=bs // tpf,
                        max_new_tokens=max_new, temperature=1.0, seed=0)
    engine = NativeEngine(lm, _IdTokenizer(), max_rows=rows, cuda_graphs=cuda_graphs)
    engine.generate(prompts, sp)  # warm-up (kernels, allocator, graph capture)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    batch = engine.generate(prompts, sp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(len(r) for r in batch.response_ids)
    forwards = int(batch.num_forwards.max() + batch.num_store_passes.max())  # rows advance in lockstep here
    return {"tokens_per_s": tokens / seconds, "tpf": batch.batch_tpf, "seconds": seconds, "tokens": tokens,
            "ms_per_forward": seconds / forwards * 1e3, "cuda_graphs": cuda_graphs}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sdar-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128], help="rows per block forward")
    ap.add_argument("--prompt-len", type=int, default=256, help="cached tokens before the block (rounded down to "
                    "whole blocks)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--decode-attention", choices=["dense", "lengths", "flex", "auto"], default="auto",
                    help="attention of the block forwards (BlockDiffusionLM.decode_attention)")
    ap.add_argument("--compare", nargs="*", default=["dense"], choices=["dense", "lengths", "flex"],
                    help="also time the block forward with these decode_attention kernels, equal and mixed rows")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time the CUDA-graph block forward (equal rows) and engine runs with cuda_graphs=True")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth, GB/s (H200: 4800)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak, TFLOP/s (H200 bf16: 989)")
    ap.add_argument("--tpf", type=int, default=4, help="fixed tokens per forward of the static-strategy run")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="engine run: tokens generated per row")
    ap.add_argument("--engine-batches", type=int, nargs="*", default=None,
                    help="rows of the engine runs (default: --batches)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    bs = args.block_size
    if bs % args.tpf:
        raise SystemExit(f"--tpf={args.tpf} must divide --block-size={bs} (static strategy: block_size/tpf steps)")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        raise SystemExit("--cuda-graphs needs --device cuda")
    if args.bandwidth_gbs <= 0 or args.peak_tflops <= 0:
        raise SystemExit("--bandwidth-gbs and --peak-tflops must be > 0")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    plen = args.prompt_len // bs * bs
    torch.manual_seed(0)
    lm = build(args.shape, device, dtype, bs, "sdpa").eval()
    lm.decode_attention = args.decode_attention
    result: dict = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "block_size": bs,
                    "prompt_len": plen, "decode_attention": args.decode_attention,
                    "bandwidth_gbs": args.bandwidth_gbs, "peak_tflops": args.peak_tflops,
                    "torch": torch.__version__, "forward": [], "engine": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for rows in args.batches:
        row = {"rows": rows, **floors(lm, rows, bs, args.bandwidth_gbs, args.peak_tflops)}
        row["block_forward_ms"] = block_forward_ms(lm, rows, plen, bs, device, args.warmup, args.repeats)
        row["x_weight_read_floor"] = row["block_forward_ms"] / row["weight_read_floor_ms"]
        row["mfu"] = row["flop_floor_ms"] / row["block_forward_ms"]
        for kernel in [args.decode_attention, *args.compare]:  # kernel choice by measurement
            lm.decode_attention = kernel
            if kernel != args.decode_attention:
                row[f"{kernel}_block_forward_ms"] = block_forward_ms(lm, rows, plen, bs, device, args.warmup,
                                                                     args.repeats)
            row[f"{kernel}_mixed_rows_block_forward_ms"] = block_forward_ms(lm, rows, plen, bs, device, args.warmup,
                                                                            args.repeats, mixed=True)
        lm.decode_attention = args.decode_attention
        if args.cuda_graphs:
            try:  # a capture that fails is reported, and the other figures still come out
                row["graphs_block_forward_ms"] = block_forward_ms(lm, rows, plen, bs, device, args.warmup,
                                                                  args.repeats, graphs=True)
                row["graphs_x_weight_read_floor"] = row["graphs_block_forward_ms"] / row["weight_read_floor_ms"]
                row["graphs_mfu"] = row["flop_floor_ms"] / row["graphs_block_forward_ms"]
            except RuntimeError as err:
                row["graphs_error"] = f"{type(err).__name__}: {err}"[:500]
        result["forward"].append(row)
        print(f"rows {rows:4d}: {row['block_forward_ms']:8.2f} ms/forward   weight-read floor "
              f"{row['weight_read_floor_ms']:.2f} ms (x{row['x_weight_read_floor']:.2f})   FLOP floor "
              f"{row['flop_floor_ms']:.2f} ms (MFU {row['mfu']:.1%})", flush=True)
        for kernel in dict.fromkeys([args.decode_attention, *args.compare]):
            equal = row["block_forward_ms"] if kernel == args.decode_attention else row[f"{kernel}_block_forward_ms"]
            print(f"    {kernel:>7}: equal rows {equal:8.2f} ms   mixed rows "
                  f"{row[f'{kernel}_mixed_rows_block_forward_ms']:8.2f} ms", flush=True)
        if "graphs_error" in row:
            print(f"     graphs: failed: {row['graphs_error']}", flush=True)
        elif args.cuda_graphs:
            print(f"     graphs: equal rows {row['graphs_block_forward_ms']:8.2f} ms "
                  f"(x{row['graphs_x_weight_read_floor']:.2f} weight-read floor, MFU {row['graphs_mfu']:.1%})",
                  flush=True)
    for rows in args.engine_batches if args.engine_batches is not None else args.batches:
        for tpf in sorted({1, args.tpf}):
            for graphs in [False, True] if args.cuda_graphs else [False]:
                try:
                    run = {"rows": rows, "static_tpf": tpf,
                           **engine_tokens_per_s(lm, rows, plen, bs, args.max_new_tokens, tpf, device, graphs)}
                except RuntimeError as err:
                    if not graphs:
                        raise
                    result["engine"].append({"rows": rows, "static_tpf": tpf, "cuda_graphs": True,
                                             "error": f"{type(err).__name__}: {err}"[:500]})
                    print(f"engine rows {rows:4d} graphs failed: {err}", flush=True)
                    continue
                result["engine"].append(run)
                print(f"engine rows {rows:4d} TPF {run['tpf']:.2f}{' graphs' if graphs else '       '}: "
                      f"{run['tokens_per_s']:10.1f} tokens/s  {run['ms_per_forward']:7.2f} ms/forward", flush=True)
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    print(json.dumps(result))
    if args.out:
        from lrl.atomic import atomic_write

        atomic_write(args.out, json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    main()
