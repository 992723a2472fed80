"""The method benchmark's dUltra plumbing (scripts/bench_method.py): planner rows read at p ≥ 0.5 with the same
columns as the threshold methods, every frontier on one plot, and the planner methods' arguments instantiate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _sweep(acc_static, points: dict[str, tuple[float, float]]):
    out = [{"setting": "static_1tok", "threshold": None, "accuracy": acc_static, "tpf": 1.0,
            "forwards_per_response": 40.0}]
    for setting, (acc, tpf) in points.items():
        out.append({"setting": setting, "threshold": float(setting.split("@")[1]), "accuracy": acc, "tpf": tpf,
                    "forwards_per_response": 40.0 / tpf})
    return out


def test_planner_rows_share_the_table_and_the_plot(tmp_path):
    from bench_method import PLANNER_BASE, frontiers, method_table, summarize, write_outputs

    base = _sweep(50, {"dynamic@0.9": (50, 2.0), "dynamic@0.5": (46, 3.0)})
    results = {
        "SFT base": [base, base],
        "LightningRL": [_sweep(50, {"dynamic@0.9": (50, 4.0), "dynamic@0.5": (50, 6.0)})] * 2,
        # a planner sweep has no φ = 0.9 point; its row is p ≥ 0.5 (also a threshold 0.5 here: not the φ one)
        PLANNER_BASE: [_sweep(50, {"planner@0.7": (50, 2.5), "planner@0.5": (48, 4.0)})] * 2,
        "dUltra": [_sweep(50, {"planner@0.7": (50, 3.0), "planner@0.5": (44, 8.0)}),
                   _sweep(50, {"planner@0.7": (50, 3.0), "planner@0.5": (46, 4.0)})],
    }
    s = summarize(results, 0.9)
    assert s["dUltra"]["acc"] == [44, 46] and s["dUltra"]["tpf"] == [8.0, 4.0]
    assert s["dUltra"]["forwards"] == [5.0, 10.0]
    assert s[PLANNER_BASE]["acc"] == [48, 48] and s["LightningRL"]["tpf"] == [4.0, 4.0]
    lines = method_table(s, 0.9).splitlines()
    header = lines[0].split("|")
    row = next(line for line in lines if line.startswith("| dUltra |"))
    assert len(row.split("|")) == len(header)  # the same columns as every other row
    # acc 45 ± 1, TPF 6 ± 2, forwards 7.5 ± 2.5; Δacc vs base −5, TPF × base 3, forwards × base 7.5 / 20
    assert "| 45.0 ± 1.0 | 6.00 ± 2.00 |" in row and "| 7.50 ± 2.50 |" in row and "| -5.0 | 3.00 | 0.38 |" in row
    assert any("p ≥ 0.5" in line for line in lines)
    tpf, acc = frontiers(results)["dUltra"]
    assert tpf == [1.0, 3.0, 6.0] and acc == [50, 50, 45]  # means over seeds, sorted by TPF
    write_outputs({"results": results, "seeds": [0, 1], "select_threshold": 0.9}, tmp_path)
    assert (tmp_path / "method.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["dUltra", "dUltra, planner-only", "LightningRL → planner"])
def test_planner_methods_instantiate(method, tiny_checkpoint, tmp_path, monkeypatch):
    """Each dUltra method's `lrl fit` arguments (configs/quickstart.yaml + the planner keys of configs/dultra.yaml
    + its own) build a module and datamodule with the planner settings."""
    from bench_method import PLANNER_CONFIG, PLANNER_METHODS, planner_args

    from lrl.cli import cli_main
    from lrl.config_files import merged_config

    monkeypatch.chdir(tmp_path)
    configs = [str(ROOT / "configs" / "quickstart.yaml")]
    p_args = planner_args(merged_config([*configs, str(ROOT / PLANNER_CONFIG)]))
    assert any(a.startswith("--data.init_args.remasking_strategy=") for a in p_args)
    first, extra = PLANNER_METHODS[method]
    cli = cli_main(["--config", configs[0], *p_args, f"--checkpoint={tiny_checkpoint}", *extra,
                    "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
    hp = cli.model.hparams
    assert cli.datamodule.hparams.remasking_strategy == "planner"
    assert [t.name for t in cli.datamodule.reward_terms] == ["acc", "tpf", "steps"]  # dUltra's step-count term
    assert hp.planner_head is not None and hp.planner_lr == 1e-3 and list(cli.model.eval_cfg.planner_thresholds)
    assert hp.freeze_backbone == (method != "dUltra")
    assert first in (None, "LightningRL")
