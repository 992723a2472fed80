"""The validation sweep of the shipped quickstart config, pinned: its evaluation settings (thresholds, budget,
anchor) read from configs/quickstart.yaml give these exact counts on the tiny model. The command line names no
evaluation key, so it is the same before and after the evaluation arguments became one group (issue 31 item 4)."""

from __future__ import annotations

import json
from pathlib import Path

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_validation_sweep_is_pinned(peaky_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(peaky_checkpoint),
              "--block_size", "4", "--data.init_args.task_kwargs={num_train: 10, num_eval: 3}",
              "--data.init_args.eval_size=3", f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
              "--trainer.enable_progress_bar=false"])
    data = json.loads(next((tmp_path / "logs").rglob("pareto.json")).read_text())
    got = [(p["setting"], p["num_responses"], p["tokens"], p["forwards"], p["store_passes"], p["accuracy"])
           for p in data["points"]]
    assert got == PINNED


# recorded on main at 6db9831 (before the grouping): every response runs to the 48-token budget; the forwards fall
# with the threshold; one store pass per 4-token block
PINNED = [("static_1tok", 3, 144, 144, 36, 0.0), ("dynamic@0.9", 3, 144, 119, 36, 0.0),
          ("dynamic@0.7", 3, 144, 90, 36, 0.0), ("dynamic@0.5", 3, 144, 57, 36, 0.0),
          ("dynamic@0.3", 3, 144, 40, 36, 0.0)]


def test_a_checkpoint_with_the_flat_evaluation_knobs_is_refused_naming_the_move(tmp_path):
    import pytest
    import torch

    from lrl.cli_checks import check_ckpt_path

    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"eval_thresholds": [0.9], "eval_max_new_tokens": 8}}, old)
    config = {"ckpt_path": str(old), "model": {"class_path": "lrl.module.LightningRLModule", "init_args": {}}}
    with pytest.raises(ValueError, match=r"eval_max_new_tokens, eval_thresholds\); move them under "
                                         r"hyper_parameters\['eval'\]"):
        check_ckpt_path(config, "fit")
    # the migration of docs/evaluation.md: the check passes it (the next check wants this model's weights)
    ckpt = torch.load(old, weights_only=False)
    hp = ckpt["hyper_parameters"]
    hp["eval"] = {k[len("eval_"):]: hp.pop(k) for k in [k for k in hp if k.startswith("eval_")]}
    torch.save(ckpt, old)
    check_ckpt_path(config, "fit")
    migrated = torch.load(old, weights_only=False)["hyper_parameters"]
    assert migrated == {"eval": {"thresholds": [0.9], "max_new_tokens": 8}}
