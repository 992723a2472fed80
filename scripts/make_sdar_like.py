"""Write an SDAR-format checkpoint with the real Qwen3 vocabulary and random tiny weights, offline.

    python scripts/make_sdar_like.py --out outputs/sdar_like [--hidden 64 --layers 2 --with-bd-fields]

The directory looks like an official SDAR-*-Chat checkpoint (config.json with ``model_type: sdar``,
``SDARForCausalLM`` and ``auto_map``; generation_config.json with ``<|im_end|>``/``<|endoftext|>`` as stop tokens;
Qwen3's tokenizer with ``<|MASK|>`` at 151669 and the chat template), so ``lrl fit / validate / serve`` can be tried
on it exactly as on a downloaded one. See `lrl.models.sdar_like`.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 3 × hidden)")
    p.add_argument("--max-positions", type=int, default=4096, help="max_position_embeddings")
    p.add_argument("--with-bd-fields", action="store_true",
                   help="also write block_size and mask_token_id into config.json, as DiRL's edited configs do")
    p.add_argument("--block-size", type=int, default=4, help="block_size written with --with-bd-fields")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lrl.models.sdar_like import build_sdar_like_checkpoint

    path = build_sdar_like_checkpoint(
        args.out, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate, max_position_embeddings=args.max_positions,
        with_bd_fields=args.with_bd_fields, block_size=args.block_size, seed=args.seed,
    )
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
