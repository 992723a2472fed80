"""Milliseconds per forward at a real model shape: the rollout engine's prefill / block / store forwards and the
training forward+backward (`diffusion_logits`), with random weights (timing does not depend on them).

    python scripts/bench_forward.py --shape sdar-8b --device cuda --dtype bfloat16 --rows 64
    python scripts/bench_forward.py --shape tiny --device cpu --dtype float32 --rows 4     # smoke run

Prints one JSON object (also written to ``--out``). Shapes follow the public configs (SDAR-8B / 1.7B are Qwen3-8B
/ 1.7B-shaped); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    "sdar-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=12288, vocab_size=151936),
    "sdar-1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=6144, vocab_size=151936),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=384, vocab_size=64),
}


def build(shape: str, device: torch.device, dtype: torch.dtype, block_size: int, attention: str, **overrides):
    """A random-weight `BlockDiffusionLM` of ``shape`` (``overrides``: config fields, e.g. fewer layers)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from lrl.models import BlockDiffusionConfig, BlockDiffusionLM

    shape_cfg = {**SHAPES[shape], **overrides}
    cfg = Qwen3Config(**shape_cfg, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no host-side 8B init: allocate on the target device, then fill
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02)
    with torch.device(device):  # its inv_freq buffer was never computed on the meta device
        model.model.rotary_emb = Qwen3RotaryEmbedding(cfg)
    bd = BlockDiffusionConfig(mask_token_id=cfg.vocab_size - 1, block_size=block_size)
    return BlockDiffusionLM(model, bd, attention=attention)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sdar-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=64, help="sequences decoded together")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--train-len", type=int, default=768, help="training row: prompt + response tokens")
    ap.add_argument("--train-copies", type=int, default=4, help="noisy copies packed per training row")
    ap.add_argument("--attention", choices=["sdpa", "flex"], default="sdpa", help="training forward attention")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bs, rows, plen = args.block_size, args.rows, args.prompt_len // args.block_size * args.block_size
    torch.manual_seed(0)
    lm = build(args.shape, device, dtype, bs, args.attention).eval()
    vocab = lm.hf_config.vocab_size
    params = sum(p.numel() for p in lm.parameters())
    result: dict = {"shape": args.shape, "params": params, "device": str(device), "dtype": args.dtype,
                    "rows": rows, "prompt_len": plen, "block_size": bs}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)

    prompt = torch.randint(0, vocab - 1, (rows, plen), device=device)
    block = torch.full((rows, bs), vocab - 1, device=device)

    def fresh_prefilled():
        cache = lm.new_cache(rows, plen + 4 * bs)
        lm.forward_chunk(cache, prompt, block_size=bs, store=torch.full((rows,), plen, device=device))
        return cache

    result["prefill_ms"] = timed(fresh_prefilled, device, args.warmup, args.repeats)
    cache = fresh_prefilled()
    result["block_forward_ms"] = timed(lambda: lm.forward_chunk(cache, block, block_size=bs), device,
                                       args.warmup, args.repeats)
    result["block_tokens_per_s_at_tpf1"] = rows / result["block_forward_ms"] * 1e3

    # training: forward + backward of one packed row ([noisy copies | clean]), the trajectory estimator's unit
    lm.train()
    length = args.train_len // bs * bs
    ids = torch.randint(0, vocab - 1, (1, length), device=device)
    masks = torch.zeros(1, args.train_copies, length, dtype=torch.bool, device=device)
    for k in range(args.train_copies):  # copy k masks a different quarter of every response block
        masks[0, k, plen:] = (torch.arange(plen, length, device=device) % bs) % args.train_copies == k
    lengths = torch.tensor([length], device=device)

    def train_step():
        lm.zero_grad(set_to_none=True)
        lm(ids, masks, lengths, bs).float().logsumexp(-1).sum().backward()

    result["train_fwd_bwd_ms"] = timed(train_step, device, 1, max(2, args.repeats // 2))
    result["train_tokens"] = int(masks.sum())
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
