"""Export the policy of an `lrl fit` RL checkpoint (.ckpt) as an HF checkpoint directory.

The directory is what every other tool takes as ``--checkpoint``: `lrl validate`, `lrl serve`, another `lrl fit`,
`scripts/build_base.py --skip-train --checkpoint`, `scripts/forward_anatomy.py`, plain transformers loaders. It
keeps the block-diffusion identity and the tokenizer, and the planner head (dUltra) when the run had one. A LoRA run
(``model.init_args.lora``; its .ckpt holds the adapters only) is exported merged: the base reloaded in float32,
W + (alpha / rank)·B·A folded into each adapted layer (peft's ``merge_and_unload``), a plain checkpoint.

    python scripts/export_policy.py --ckpt outputs/quickstart/checkpoints/last.ckpt --out outputs/quickstart/policy

The run's base checkpoint (its ``checkpoint`` argument, the architecture and tokenizer) is read from the .ckpt;
``--base`` overrides it (e.g. a relative path recorded by a run started in another directory).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_policy(ckpt: str | Path, out: str | Path, base: str | None = None) -> Path:
    """Write the policy weights of ``ckpt`` to the HF directory ``out`` (atomically, as `save_checkpoint` writes:
    an existing ``out`` is replaced only once the new one is complete)."""
    import torch

    from lrl.models import save_checkpoint
    from lrl.models.lora import merge_lora
    from lrl.module import LightningRLModule

    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--ckpt: no checkpoint file at {ckpt}")
    source: str | io.BytesIO = str(ckpt)
    if base:  # `checkpoint` is also the name of Lightning's own loader argument: override it in the saved hparams
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state["hyper_parameters"]["checkpoint"] = base
        source = io.BytesIO()
        torch.save(state, source)
        source.seek(0)
    # a frozen reference is not needed to export: kl_beta=0 skips loading it (the rest of the loss group is unused)
    module = LightningRLModule.load_from_checkpoint(source, map_location="cpu", loss={"kl_beta": 0.0})
    merge_lora(module.policy)  # LoRA: adapters folded into the (float32) base; a no-op otherwise
    save_checkpoint(module.policy, out, tokenizer=module.tokenizer)  # atomic: a temp sibling swapped in
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True,
                    help="an `lrl fit` RL checkpoint (.ckpt), e.g. <run>/checkpoints/last.ckpt")
    ap.add_argument("--out", required=True, help="HF checkpoint directory to write")
    ap.add_argument("--base", default=None, help="override the run's base checkpoint directory recorded in the .ckpt")
    args = ap.parse_args(argv)
    try:
        path = export_policy(args.ckpt, args.out, args.base)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise SystemExit(f"export_policy: {exc}") from exc
    print(f"policy written to {path}")
    return path


if __name__ == "__main__":
    main()
