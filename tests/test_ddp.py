"""Two-process DDP (gloo, CPU): each rank rolls out its own prompt groups; the ranks' weights stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_ddp_two_processes_gloo(tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "lrl.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--block_size",
        "4",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.accelerator=cpu",
        "--data.init_args.prompts_per_step=2",
        "--data.init_args.group_size=2",
        "--data.init_args.max_new_tokens=8",
        "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}",
        "--data.init_args.max_refill_rounds=1",
        "--data.init_args.threshold=0.0",
        "--model.init_args.minibatches=2",
        "--model.init_args.micro_batch_size=1",
        "--model.init_args.lr=1e-2",
        "--model.init_args.warmup_steps=0",
        "--model.init_args.max_rl_steps=1",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.callbacks=[{class_path: callbacks.TPFAwareFilter, init_args: {all_wrong: false, "
        "tpf_range_threshold: null}}, {class_path: callbacks.WeightSync}, "
        f"{{class_path: ddp_dump.DumpWeights, init_args: {{out: {out}/weights}}}}, "
        f"{{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {out}/ckpts, "
        "save_last: true, every_n_train_steps: 1}}]",
    ]
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = torch.load(out / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] > 0
    dumps = sorted((out / "weights").glob("rank*.pt"))
    assert len(dumps) == 2, f"expected one weight dump per rank, got {dumps}"
    a, b = (torch.load(p) for p in dumps)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=0, atol=0, msg=f"ranks diverged at {k}")
    # each rank generated its own share of prompt groups: 2 per step, never the same prompt
    assert len(a["prompts"]) == len(b["prompts"]) == 2  # 1 RL step of 2 prompt groups per rank
    assert not set(a["prompts"]) & set(b["prompts"])
