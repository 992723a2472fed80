"""Time one whole RL step at a real model shape, phase by phase: rollout, reward, old log-probs, training and
weight sync, plus peak GPU memory (random weights; nothing is downloaded).

    python scripts/bench_rl_step.py --shape sdar-1.7b --device cuda --dtype bfloat16 --out outputs/bench/rl_step.json
    python scripts/bench_rl_step.py --shape tiny --device cpu --dtype float32 --prompts 2 --samples 2 \\
        --prompt-len 8 --max-new-tokens 8 --block-size 4 --tpf 2                          # smoke run

The step is the one `lrl fit` runs with the native engine, written out with the same library functions so each
phase can be timed on its own:
* rollout: `NativeEngine.generate` on a deep copy of the policy (as the datamodule builds it), ``--prompts`` ×
  ``--samples`` rows, static strategy at ``--tpf`` tokens per forward (random weights cannot give a realistic
  dynamic TPF), no stop tokens, so every response has ``--max-new-tokens`` tokens;
* reward: decode the responses (the real Qwen3 tokenizer at SDAR shapes), score them with the math verifier
  against a fixed answer, batch-normalised advantages;
* old log-probs: a no-grad pass of the trajectory estimator (`response_logprobs`), micro-batch by micro-batch;
* train: the trajectory estimator with grad, `lightningrl_loss` (no KL reference), backward per micro-batch, one
  clipped AdamW step;
* weight sync: `NativeEngine.update_weights` from the policy's parameters (the copy `lrl.pipeline.RLStep.sync`
  makes when the engine holds its own weights).
Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import _IdTokenizer  # noqa: E402
from bench_forward import SHAPES, build  # noqa: E402


def _tokenizer(kind: str, vocab: int):
    if kind == "qwen":
        from lrl.models.sdar_like import build_qwen3_tokenizer

        tok = build_qwen3_tokenizer()
        if len(tok) > vocab:
            raise SystemExit(f"--tokenizer qwen has {len(tok)} tokens, more than the shape's vocab of {vocab}")
        return tok
    return _IdTokenizer()


class _Clock:
    """Wall time per phase, synchronising the device around each one so that queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def __call__(self, name: str):
        clock = self

        class _Phase:
            def __enter__(self):
                clock._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock._sync()
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def rl_step(policy, engine, tokenizer, args, clock: _Clock, opt) -> dict:
    from lrl.algorithms.advantages import compute_advantages
    from lrl.algorithms.logprobs import Scoring, response_logprobs
    from lrl.algorithms.losses import LossConfig, build_normalizer, lightningrl_loss
    from lrl.rewards.math import score_math
    from lrl.rollout import SamplingParams

    bs, vocab = args.block_size, policy.hf_config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, min(vocab, 100_000) - 1, (args.prompts, args.prompt_len), generator=g).tolist()
    sp = SamplingParams(block_size=bs, remasking_strategy="low_confidence_static", denoising_steps=bs // args.tpf,
                        max_new_tokens=args.max_new_tokens, samples_per_prompt=args.samples, seed=args.seed)
    with clock("rollout"):
        batch = engine.generate(prompts, sp)
    n = len(batch)
    with clock("reward"):
        texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
        correct = torch.tensor(score_math(texts, ["42"] * n), dtype=torch.bool)
        adv = compute_advantages(correct.float(), batch.group_index)
    mbs = args.micro_batch_size
    micro = [list(range(s, min(n, s + mbs))) for s in range(0, n, mbs)]

    def logprobs(rows):
        return response_logprobs(
            policy, [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows],
            [batch.step_maps[i] for i in rows],
            Scoring("trajectory", block_size=bs, pad_id=tokenizer.pad_token_id, max_copies=args.max_copies,
                    rows_per_forward=args.rows_per_forward, temperature=sp.temperature),
            tail_ids=[batch.tail_ids[i] for i in rows], tail_step_maps=[batch.tail_step_maps[i] for i in rows],
        )[0]

    with clock("old_logprobs"), torch.no_grad():
        policy.eval()
        old = [logprobs(rows) for rows in micro]
    policy.train()
    lengths = torch.tensor([len(r) for r in batch.response_ids])
    with clock("train"):
        norm = build_normalizer(lengths, correct)
        opt.zero_grad(set_to_none=True)
        for rows, old_lp in zip(micro, old):
            logp = logprobs(rows)
            dev = logp.device
            idx = torch.tensor(rows)
            out = lightningrl_loss(
                logp, old_lp, torch.repeat_interleave(adv[idx], lengths[idx]).to(dev),
                torch.repeat_interleave(torch.arange(len(rows)), lengths[idx]).to(dev), norm,
                LossConfig(kl_beta=0.0), correct_tokens=torch.repeat_interleave(correct[idx], lengths[idx]).to(dev),
            )
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
    with clock("weight_sync"):
        engine.update_weights(policy.model.named_parameters())
    synced = all(torch.equal(a, b) for a, b in zip(policy.parameters(), engine.lm.parameters()))
    return {"responses": n, "response_tokens": int(lengths.sum()), "rollout_tpf": batch.batch_tpf,
            "correct": int(correct.sum()), "weight_version": engine.weight_version, "engine_matches_policy": synced}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="sdar-1.7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8, help="responses per prompt (group size)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--tpf", type=int, default=4, help="fixed tokens per forward of the rollout (static strategy)")
    ap.add_argument("--decode-attention", choices=["dense", "lengths", "flex", "auto"], default="auto")
    ap.add_argument("--cuda-graphs", action="store_true", help="rollout with NativeEngine(cuda_graphs=True)")
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--max-copies", type=int, default=8)
    ap.add_argument("--rows-per-forward", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--tokenizer", choices=["qwen", "ids"], default=None,
                    help="response decoding for the reward (default: qwen at SDAR shapes, ids otherwise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.block_size % args.tpf:
        raise SystemExit(f"--tpf={args.tpf} must divide --block-size={args.block_size}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    policy = build(args.shape, device, dtype, args.block_size, "sdpa")
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    from lrl.rollout import NativeEngine

    tokenizer = _tokenizer(args.tokenizer or ("ids" if args.shape == "tiny" else "qwen"), policy.hf_config.vocab_size)
    rollout_lm = copy.deepcopy(policy).eval().requires_grad_(False)
    rollout_lm.decode_attention = args.decode_attention
    engine = NativeEngine(rollout_lm, tokenizer, max_rows=args.prompts * args.samples, cuda_graphs=args.cuda_graphs)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = _Clock(device)
    t0 = time.perf_counter()
    info = rl_step(policy, engine, tokenizer, args, clock, opt)
    total = time.perf_counter() - t0
    result = {"shape": args.shape, "device": str(device), "dtype": args.dtype, "prompts": args.prompts,
              "samples": args.samples, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
              "block_size": args.block_size, "static_tpf": args.tpf, "estimator": "trajectory",
              "cuda_graphs": args.cuda_graphs, "decode_attention": args.decode_attention,
              "params": sum(p.numel() for p in policy.parameters()), "torch": torch.__version__, **info,
              "seconds": {k: round(v, 3) for k, v in clock.seconds.items()}, "total_s": round(total, 3)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    for name, s in result["seconds"].items():
        print(f"{name:>13}: {s:9.3f} s  ({s / total:.0%})", flush=True)
    print(json.dumps(result))
    if args.out:
        from lrl.atomic import atomic_write

        atomic_write(args.out, json.dumps(result, indent=2).encode())
    return result


if __name__ == "__main__":
    main()
