"""Running `lrl fit` on the tiny model in 2 CPU processes (gloo), shared by the DDP, FSDP and serve tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_two_rank_fit(ckpt, out: Path, *args: str, configs: tuple[str, ...] = ("quickstart.yaml",)) -> None:
    """`python -m lrl.cli fit` with ``configs`` (from configs/), 2 CPU devices, 2 groups × 2 samples of 8 tokens per
    rank and step, lr 1e-2 without warmup, then ``args``; run in ``out.parent``; asserts that it succeeded."""
    cmd = [sys.executable, "-m", "lrl.cli", "fit"]
    for name in configs:
        cmd += ["--config", str(ROOT / "configs" / name)]
    cmd += [
        "--checkpoint", str(ckpt), "--block_size", "4",
        "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=2",
        "--data.init_args.max_new_tokens=8", "--data.init_args.max_refill_rounds=1",
        "--model.init_args.lr=1e-2", "--model.init_args.warmup_steps=0",
        f"--trainer.default_root_dir={out}", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=str(out.parent), env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def free_port() -> int:
    """A free local TCP port for a gloo process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
