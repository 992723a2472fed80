"""scripts/export_policy.py: bad input fails early with one line and writes nothing (the happy path, a planner
run's last.ckpt exported and reloaded with its head, is in tests/test_planner.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    from export_policy import main

    with pytest.raises(SystemExit, match=r"^export_policy: --ckpt: no checkpoint file at .*nope\.ckpt$"):
        main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "policy")])
    assert list(tmp_path.iterdir()) == []


def test_base_override_loads_a_run_whose_recorded_base_moved(tmp_path, tiny_checkpoint):
    """`--base` replaces the base directory recorded in the .ckpt (here one that no longer exists), and the export
    holds the run's trained weights, not the base's."""
    import lightning
    import torch
    from export_policy import main

    from lrl.models import load_checkpoint
    from lrl.module import LightningRLModule

    module = LightningRLModule(checkpoint=str(tiny_checkpoint), loss={"kl_beta": 0.0})
    module.configure_model()
    with torch.no_grad():
        module.policy.model.lm_head.weight.add_(0.5)  # the "trained" policy differs from its base
    hparams = dict(module.hparams, checkpoint=str(tmp_path / "moved_base"))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    exported, _ = load_checkpoint(main(["--ckpt", str(ckpt), "--out", str(tmp_path / "policy"),
                                        "--base", str(tiny_checkpoint)]))
    base, _ = load_checkpoint(tiny_checkpoint)
    assert torch.equal(exported.model.lm_head.weight, module.policy.model.lm_head.weight)
    assert torch.allclose(exported.model.lm_head.weight - base.model.lm_head.weight, torch.full_like(
        base.model.lm_head.weight, 0.5))
