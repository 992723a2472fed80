"""The process-group timeout is a setting (issue 28 item 8): ``collective_timeout_s`` reaches the DDP / FSDP
strategy that creates the process group; the shipped 8-GPU pieces set one hour."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _strategy(ckpt, *extra: str):
    cli = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(ckpt),
                    "--block_size=4", "--trainer.logger=false", "--trainer.callbacks=[]", *extra], run=False)
    return cli.trainer.strategy


def test_ddp_piece_sets_one_hour(tiny_checkpoint):
    strategy = _strategy(tiny_checkpoint, "--config", str(ROOT / "configs" / "trainer" / "ddp_8gpu.yaml"),
                         "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true")
    assert type(strategy).__name__ == "DDPStrategy" and strategy._timeout == timedelta(seconds=3600)


def test_fsdp_strategy_gets_the_setting(tiny_checkpoint):
    strategy = _strategy(tiny_checkpoint, "--trainer.strategy={class_path: ddp_dump.CPUFSDPStrategy}",
                         "--trainer.accelerator=cpu", "--trainer.devices=2", "--collective_timeout_s=120")
    assert strategy._timeout == timedelta(seconds=120)


def test_default_is_lightnings_and_bad_values_are_refused(tiny_checkpoint):
    strategy = _strategy(tiny_checkpoint, "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2")
    assert strategy._timeout == timedelta(seconds=1800)
    with pytest.raises(ValueError, match="collective_timeout_s must be an int >= 1"):
        _strategy(tiny_checkpoint, "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2",
                  "--collective_timeout_s=0")


def test_shipped_fsdp_configs_set_it():
    from lrl.config_files import merged_config

    for f in ("configs/trainer/fsdp_8gpu.yaml", "configs/sdar_8b_b32.yaml"):
        assert merged_config([str(ROOT / f)])["collective_timeout_s"] == 3600, f
