"""Checkpoints a disk can hold (issue 28 item 7): the newest K numbered checkpoints plus the Pareto-best weights,
``last.ckpt`` a link to the newest (not a full copy) that ``--ckpt_path last`` resumes from, and sharded (directory)
saves that a failure part-way cannot damage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.checkpoint import RLCheckpoint, checkpoint_loads, resolve_last
from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _fit(ckpt, out: Path, steps: int, *extra: str):
    callbacks = (
        f"[{{class_path: callbacks.ParetoFrontierCheckpoint, init_args: {{dirpath: {out}/pareto, every_n_steps: 1, "
        "eval_size: 2, evaluate_at_start: false, keep: best}}, "
        f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, save_last: link, "
        "every_n_rl_steps: 1, keep_last: 2}}]"
    )
    return cli_main([
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(ckpt), "--block_size", "4",
        "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=2", "--data.init_args.max_new_tokens=8",
        "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}", "--data.init_args.max_refill_rounds=1",
        "--model.init_args.lr=1e-2", "--model.init_args.warmup_steps=0", "--model.init_args.micro_batch_size=4",
        "--model.init_args.eval.max_new_tokens=8", "--model.init_args.eval.thresholds=[0.5]",
        f"--model.init_args.max_rl_steps={steps}", f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
        "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",  # every group trains
        f"--trainer.callbacks={callbacks}", *extra,
    ])


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_keeps_the_newest_k_and_the_pareto_best_and_resumes_from_the_last_link(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    _fit(tiny_checkpoint, out, 5)
    ckpts = out / "ckpts"
    # 5 saves with keep_last 2: steps 4 and 5 remain; last.ckpt is a link to step 5, not a third full file
    assert _names(ckpts) == ["last.ckpt", "rl_step=4.ckpt", "rl_step=5.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and os.readlink(ckpts / "last.ckpt") == "rl_step=5.ckpt"
    # 5 evaluations with keep: best: one HF model directory on disk, the best-AUP step's
    front = json.loads((out / "pareto" / "frontier.json").read_text())
    assert len(front["history"]) == 5
    models = sorted(p.parent.name for p in (out / "pareto").glob("step-*/model"))
    assert models == [f"step-{front['best_aup_step']:06d}"]
    assert [h["kept"] for h in front["history"]].count(True) == 1
    assert resolve_last([ckpts])[0] == ckpts / "last.ckpt"

    cli = _fit(tiny_checkpoint, out, 6, "--ckpt_path", "last")
    assert cli.model.rl_step == 6 and Path(cli.trainer.ckpt_path).name == "last.ckpt"
    assert _names(ckpts) == ["last.ckpt", "rl_step=5.ckpt", "rl_step=6.ckpt"]  # retention continues after resume
    assert os.readlink(ckpts / "last.ckpt") == "rl_step=6.ckpt"
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["lrl"]["rl_step"] == 6


class _ShardedTrainer:
    """What `RLCheckpoint._save_checkpoint` uses of a trainer with a sharded strategy (one rank): its save writes a
    DCP-like directory (``.metadata``, a shard, Lightning's ``meta.pt``), and fails part-way when told to."""

    def __init__(self):
        self.strategy = SimpleNamespace(_state_dict_type="sharded", barrier=lambda name=None: None)
        self.is_global_zero, self.global_step, self.loggers = True, 0, []
        self.fail_after_shard = False

    def save_checkpoint(self, path, weights_only=False):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_bytes(b"shard of step %d" % self.global_step)
        if self.fail_after_shard:
            raise RuntimeError("killed while writing the shards")
        (path / ".metadata").write_bytes(b"index")
        torch.save({"global_step": self.global_step, "state_dict": {}}, path / "meta.pt")


def test_a_sharded_save_failing_part_way_leaves_the_previous_checkpoint_and_no_half_directory(tmp_path):
    cb = RLCheckpoint(dirpath=str(tmp_path), keep_last=2)
    trainer = _ShardedTrainer()
    target = tmp_path / "last.ckpt"
    trainer.global_step = 1
    cb._save_checkpoint(trainer, str(target))
    assert _names(tmp_path) == ["last.ckpt"] and checkpoint_loads(target)
    trainer.global_step, trainer.fail_after_shard = 2, True
    with pytest.raises(RuntimeError, match="killed while writing"):
        cb._save_checkpoint(trainer, str(target))
    assert _names(tmp_path) == ["last.ckpt"]  # no hidden .last.ckpt.tmp left either
    assert (target / "__0_0.distcp").read_bytes() == b"shard of step 1"
    assert torch.load(target / "meta.pt", weights_only=False)["global_step"] == 1
    assert cb._last_checkpoint_saved == str(target)
    trainer.fail_after_shard = False
    cb._save_checkpoint(trainer, str(target))  # the next save replaces it whole
    assert (target / "__0_0.distcp").read_bytes() == b"shard of step 2" and _names(tmp_path) == ["last.ckpt"]


def test_a_sharded_directory_without_its_index_or_state_does_not_load(tmp_path):
    half = tmp_path / "rl_step=3.ckpt"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"x")
    assert not checkpoint_loads(half)  # before: any non-empty directory counted as loadable
    (half / ".metadata").write_bytes(b"index")
    (half / "meta.pt").write_bytes(b"PK truncated")
    assert not checkpoint_loads(half)
    torch.save({"state": 1}, half / "meta.pt")
    assert checkpoint_loads(half)


def test_retention_knobs_are_checked(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="RLCheckpoint.save_top_k is not supported"):
        RLCheckpoint(dirpath=str(tmp_path), save_top_k=-1)
    with pytest.raises(MisconfigurationException, match="RLCheckpoint.monitor is not supported"):
        RLCheckpoint(dirpath=str(tmp_path), monitor="val/aup")
    with pytest.raises(MisconfigurationException, match="RLCheckpoint.keep_last must be an int >= -1"):
        RLCheckpoint(dirpath=str(tmp_path), keep_last=-2)


def test_the_plan_counts_the_retained_bytes_of_the_8b_config():
    """configs/sdar_8b_b32.yaml: a checkpoint is fp32 weights + two AdamW moments (12 B/param); 80 RL steps saved
    every 10 = 8 saves, the newest 2 kept and last a link; one best-AUP HF export (4 B/param); at the peak one more
    checkpoint and one more export are being written. Keeping every save plus a full last.ckpt (the config before
    this change) is 9 checkpoints."""
    from lrl.config_files import merged_config
    from lrl.plan import build_plan

    cfg = merged_config([str(ROOT / "configs" / "sdar_8b_b32.yaml")])
    plan = build_plan(cfg, world_size=8, device_gb=80)
    disk = {r.component: r.bytes for r in plan.disk}
    p = plan.shape.params
    assert disk["one training checkpoint (.ckpt)"] == 12 * p
    assert disk["retained training checkpoints"] == 2 * 12 * p
    assert disk["retained Pareto exports"] == 4 * p
    assert disk["total over the run (peak)"] == 3 * 12 * p + 2 * 4 * p
    assert 355e9 < disk["total over the run (peak)"] < 365e9
    ckpt_cb = next(c for c in cfg["trainer"]["callbacks"] if "RLCheckpoint" in c["class_path"])
    ckpt_cb["init_args"].update(keep_last=-1, save_last=True)
    old = {r.component: r.bytes for r in build_plan(cfg, world_size=8, device_gb=80).disk}
    assert old["retained training checkpoints"] == 9 * 12 * p


def test_without_a_dirpath_checkpoints_follow_default_root_dir_and_resume_from_last(tiny_checkpoint, tmp_path):
    """The shipped configs give RLCheckpoint no dirpath (an overlay moves its checkpoints by moving
    `trainer.default_root_dir`): saves land in `<default_root_dir>/checkpoints`, where `--ckpt_path last` looks,
    not in Lightning's default (inside the logger's version folder)."""

    def fit(out, steps, *extra):
        return cli_main([
            "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(tiny_checkpoint),
            "--block_size", "4", "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=2",
            "--data.init_args.max_new_tokens=8", "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}",
            "--data.init_args.max_refill_rounds=1", "--model.init_args.micro_batch_size=4",
            "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",
            f"--model.init_args.max_rl_steps={steps}", f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.callbacks=[{class_path: callbacks.RLCheckpoint, "
            "init_args: {every_n_rl_steps: 1, save_last: link}}]", *extra,
        ])

    out = tmp_path / "run"
    fit(out, 1)
    assert _names(out / "checkpoints") == ["last.ckpt", "rl_step=1.ckpt"]
    cli = fit(out, 2, "--ckpt_path", "last")
    assert cli.model.rl_step == 2
    assert _names(out / "checkpoints") == ["last.ckpt", "rl_step=1.ckpt", "rl_step=2.ckpt"]
    assert not list(out.glob("*/main/checkpoints"))  # nothing in the logger's version folder
