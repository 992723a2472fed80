"""The Pareto evaluation: sweep semantics, artefacts, and `lrl validate` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrl.cli import cli_main
from lrl.evaluation import run_pareto_sweep, write_pareto
from lrl.models import load_checkpoint
from lrl.rollout import NativeEngine
from lrl.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_points_and_artefacts(tiny_checkpoint, tmp_path):
    lm, tok = load_checkpoint(tiny_checkpoint)
    task = get_task("synthetic", num_train=10, num_eval=6)
    records = task.load("test")
    res = run_pareto_sweep(
        NativeEngine(lm.eval(), tok),
        task,
        records,
        thresholds=[0.9, 0.0],
        block_size=4,
        max_new_tokens=8,
        stop_token_ids=(tok.eos_token_id,),
    )
    assert [p.setting for p in res.points] == ["static_1tok", "dynamic@0.9", "dynamic@0"]
    static, _, zero = res.points
    assert static.tpf == pytest.approx(1.0)  # one token per forward by construction
    assert zero.forwards < static.forwards  # threshold 0 decodes whole blocks at once
    assert all(p.num_responses == 6 for p in res.points)
    json_path, png_path = write_pareto(res, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["aup"] == pytest.approx(res.aup) and len(data["points"]) == 3
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_lrl_validate_writes_pareto(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        [
            "validate",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--block_size",
            "4",
            "--data.init_args.task_kwargs={num_train: 10, num_eval: 5}",
            "--data.init_args.eval_size=5",
            "--data.init_args.max_new_tokens=8",
            "--model.init_args.eval.max_new_tokens=8",
            "--model.init_args.eval.thresholds=[0.9, 0.5]",
            f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
            "--trainer.enable_progress_bar=false",
        ]
    )
    found = list((tmp_path / "logs").rglob("pareto.json"))
    assert found, "lrl validate wrote no pareto.json"
    data = json.loads(found[0].read_text())
    assert [p["setting"] for p in data["points"]] == ["static_1tok", "dynamic@0.9", "dynamic@0.5"]
    assert found[0].with_name("pareto.png").exists()
    # the synthetic task checks worked steps: its sound accuracy is logged beside the verifier's
    metrics = cli.trainer.callback_metrics
    for p in data["points"]:
        key = "static" if p["threshold"] is None else f"{p['threshold']:g}"
        assert float(metrics[f"val/sound@{key}"]) == pytest.approx(p["sound_accuracy"])
        assert p["sound_accuracy"] <= p["accuracy"]


def test_aup_dropped_points_reach_the_result_and_table():
    from lrl.evaluation.pareto import ParetoPoint, ParetoResult, format_table

    pts = [ParetoPoint("a", None, 80.0, 1.0, 1, 1, 0, 0.0, 1), ParetoPoint("b", 0.5, 70.0, 5.0, 5, 1, 0, 0.0, 1)]
    res = ParetoResult(points=pts, aup=80.0, y_max=80.0, aup_dropped=[(5.0, 70.0)])
    assert res.to_dict()["aup_dropped"] == [[5.0, 70.0]]
    assert "AUP leaves out 1 point(s)" in format_table(res)


def test_provenance_names_the_evaluated_weights():
    from lrl.evaluation.pareto import provenance

    assert provenance("base/dir", "runs/last.ckpt") == {"checkpoint": "runs/last.ckpt", "base_checkpoint": "base/dir",
                                                        "ckpt_path": "runs/last.ckpt"}
    assert provenance("base/dir", None)["checkpoint"] == "base/dir"


def test_lrl_validate_ckpt_path_is_the_checkpoint_in_pareto_json(tiny_checkpoint, tmp_path, monkeypatch):
    """`lrl validate --ckpt_path X` evaluates X's weights: pareto.json must name X, not the config's base."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(tiny_checkpoint),
            "--block_size", "4", "--data.init_args.task_kwargs={num_train: 10, num_eval: 2}",
            "--data.init_args.eval_size=2", "--data.init_args.max_new_tokens=8",
            "--model.init_args.eval.max_new_tokens=8", "--model.init_args.eval.thresholds=[0.5]",
            f"--trainer.logger.init_args.save_dir={tmp_path}/logs", "--trainer.enable_progress_bar=false"]
    cli = cli_main(args[1:], run=False)
    cli.model.configure_model()
    cli.trainer.strategy.connect(cli.model)
    ckpt = tmp_path / "policy.ckpt"
    cli.trainer.save_checkpoint(ckpt, weights_only=True)
    cli_main([*args, f"--ckpt_path={ckpt}"])
    data = json.loads(next((tmp_path / "logs").rglob("pareto.json")).read_text())
    assert data["checkpoint"] == str(ckpt) and data["base_checkpoint"] == str(tiny_checkpoint)
