"""Every method and ablation of scripts/bench_method.py is a valid `lrl fit` argument list on the quickstart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_method  # noqa: E402

ALL = {**bench_method.METHODS, **bench_method.ABLATIONS}


@pytest.mark.parametrize("method", list(ALL))
def test_benchmark_method_instantiates(method, tiny_checkpoint, tmp_path, monkeypatch):
    from lrl.cli import cli_main

    monkeypatch.chdir(tmp_path)
    extra = list(ALL[method])
    cli = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), f"--checkpoint={tiny_checkpoint}", *extra,
                    "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    hp = cli.model.hparams
    want_estimator = {"LightningRL, single-pass": "single_pass", "LightningRL, masked-states": "masked_states",
                      "LightningRL, masked-states, no TPF reward": "masked_states"}
    assert hp.estimator == want_estimator.get(method, "trajectory")
    no_nll = ("GRPO(traj)", "LightningRL, no NLL", "LightningRL, no NLL, no TPF reward")
    assert (hp.loss["nll_weight"] == 0.0) == (method in no_nll)
    no_tpf = ("GRPO(traj)", "LightningRL, no TPF reward", "LightningRL, masked-states, no TPF reward",
              "LightningRL, no NLL, no TPF reward")
    no_tpf_filter = ("GRPO(traj)", "LightningRL, no TPF filter")
    assert (cli.datamodule.pipeline.group_filter.tpf_range_threshold is None) == (method in no_tpf_filter)
    tpf = [t for t in cli.datamodule.reward_terms if t.name == "tpf"]
    assert (tpf[0].weight == 0.0 and tpf[0].normalize == "none") == (method in no_tpf)
