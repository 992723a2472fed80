"""``lrl serve``: an SGLang-compatible HTTP server over the native block-diffusion engine (see `lrl.serve.app`)."""

from __future__ import annotations

import argparse
import logging

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential", "planner")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrl serve",
        description="Serve a block-diffusion checkpoint with the native engine over SGLang's HTTP API subset "
        "(/generate with dllm_step_map, weight sync by disk or torch.distributed, health/model info).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=30000, help="port (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=None, help="decoding block size (default: the checkpoint's)")
    p.add_argument("--strategy", choices=STRATEGIES, default="low_confidence_dynamic", help="unmasking strategy")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence threshold of the dynamic strategy")
    p.add_argument("--planner-threshold", type=float, default=0.5,
                   help="greedy planner decoding unmasks where p >= this (strategy planner; needs a planner head)")
    p.add_argument("--denoising-steps", type=int, default=32, help="steps per block (static/sequential)")
    p.add_argument("--eos-policy", choices=("truncate", "keep_final_block"), default="truncate",
                   help="default response end at a stop token (requests may override via custom_params)")
    p.add_argument("--max-rows", type=int, default=512, help="rows decoded at once by the engine")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="KV page pool in GB (10^9 bytes); default: the dense worst case of --max-rows rows")
    p.add_argument("--transient-gb", type=float, default=2.0,
                   help="bound on one forward's sampling and attention transients, GB (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: float32 on CPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the engine's block forwards as CUDA graphs (faster at small batches; CUDA only)")
    p.add_argument("--weight-version", default="default", help="initial weight_version string")
    p.add_argument("--group-timeout", type=float, default=600.0, help="seconds to wait for weight-update groups")
    p.add_argument("--max-request-mb", type=float, default=16.0,
                   help="largest request body in MiB; larger ones get HTTP 413 (default: %(default)s)")
    p.add_argument("--log-level", default="warning", help="uvicorn/python log level")
    return p


def build_app(args: argparse.Namespace):
    """Load the checkpoint named by ``args`` and return the FastAPI app (no server started)."""
    import torch

    from lrl.models.loading import load_checkpoint
    from lrl.rollout.engine import NativeEngine
    from lrl.serve.app import DecodeConfig, create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm, tokenizer = load_checkpoint(args.model, device=device, dtype=args.dtype)
    lm.eval()
    decode = DecodeConfig(block_size=args.block_size or lm.bd.block_size, remasking_strategy=args.strategy,
                          threshold=args.threshold, denoising_steps=args.denoising_steps, eos_policy=args.eos_policy,
                          planner_threshold=args.planner_threshold)
    if args.cuda_graphs and lm.device.type != "cuda":
        raise SystemExit(f"--cuda-graphs needs a CUDA device, the model is on {lm.device}")
    for flag, value in (("--kv-cache-gb", args.kv_cache_gb), ("--transient-gb", args.transient_gb)):
        if value is not None and not value > 0:
            raise SystemExit(f"{flag} must be > 0, got {value}")
    engine = NativeEngine(lm, tokenizer, max_rows=args.max_rows, cuda_graphs=args.cuda_graphs,
                          kv_cache_gb=args.kv_cache_gb, transient_gb=args.transient_gb)
    return create_app(engine, decode, model_path=str(args.model), weight_version=args.weight_version,
                      group_timeout_s=args.group_timeout, max_request_bytes=max(1, int(args.max_request_mb * 2**20)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lrl serve --model DIR --host H --port P [...]``; blocks until the server stops."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_keep_alive=30)
    return 0


__all__ = ["build_app", "build_parser", "main"]
