"""The demo pieces: the quickstart config as shipped (1 RL step), and the benchmark/demo table writers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_demo_writes_its_artefacts(tmp_path, monkeypatch):
    """`scripts/demo.py` end to end on the committed demo base: configs/quickstart.yaml as shipped (its callbacks
    included) for one RL step with a smaller batch, then the files the demo writes: the before/after table,
    pareto.json (after and base curves), the plot and timings.json, all consistent."""
    import json

    import demo

    import lrl.cli

    monkeypatch.chdir(tmp_path)  # the shipped config's relative paths (logs, checkpoints) land here
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "base").symlink_to(ROOT / "outputs" / "base")  # the committed bases, read only
    monkeypatch.setattr(demo, "RUN", tmp_path / "outputs" / "quickstart")
    real_cli = lrl.cli.cli_main
    small = ["--data.init_args.prompts_per_step=2", "--data.init_args.group_size=2",
             "--data.init_args.max_refill_rounds=1", "--trainer.enable_progress_bar=false",
             # Lightning validates once when the 1-step run stops: a small sweep
             "--data.init_args.eval_size=3", "--model.init_args.eval.thresholds=[0.9]",
             "--model.init_args.eval.max_new_tokens=16"]
    fits = []
    monkeypatch.setattr(lrl.cli, "cli_main", lambda args: fits.append(args) or real_cli(args + small))
    assert demo.main(["--rl-steps", "1", "--eval-size", "3"]) == 0
    assert len(fits) == 1 and fits[0][:3] == ["fit", "--config", "configs/quickstart.yaml"]

    out = tmp_path / "outputs" / "quickstart" / "demo"
    pareto = json.loads((out / "pareto.json").read_text())
    timings = json.loads((out / "timings.json").read_text())
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert timings["aup_after"] == pareto["aup"] and timings["aup_before"] == pareto["base"]["aup"]
    assert timings["rl_s"] > 0 and timings["total_s"] >= timings["rl_s"]
    # the sweep's thresholds are the shipped config's (0.9 ... 0.3) plus the 1-token anchor, on 3 problems
    settings = [p["setting"] for p in pareto["points"]]
    assert settings == [p["setting"] for p in pareto["base"]["points"]] and "dynamic@0.9" in settings
    assert all(p["num_responses"] == 3 for p in pareto["points"] + pareto["base"]["points"])
    table = (out / "before_after.md").read_text()
    after9 = next(p for p in pareto["points"] if p["threshold"] == 0.9)
    before9 = next(p for p in pareto["base"]["points"] if p["threshold"] == 0.9)
    assert f"| TPF @ φ=0.9 | {before9['tpf']:.2f} | {after9['tpf']:.2f} |" in table
    assert f"| AUP over the sweep | {pareto['base']['aup']:.1f} | {pareto['aup']:.1f} |" in table


def _pts(acc_static, tpf9, acc9, acc5, tpf5):
    return [{"setting": "static_1tok", "threshold": None, "accuracy": acc_static, "tpf": 1.0},
            {"setting": "dynamic@0.9", "threshold": 0.9, "accuracy": acc9, "tpf": tpf9},
            {"setting": "dynamic@0.5", "threshold": 0.5, "accuracy": acc5, "tpf": tpf5}]


def test_method_table_numbers():
    from bench_method import method_table, summarize

    results = {
        "SFT base": [_pts(50, 2.0, 50, 46, 3.0)] * 2,
        "LightningRL": [_pts(50, 4.0, 50, 50, 6.0), _pts(50, 6.0, 48, 46, 7.0)],
    }
    s = summarize(results, 0.9)
    assert s["LightningRL"]["acc"] == [50, 48] and s["LightningRL"]["tpf"] == [4.0, 6.0]
    # base AUP with y_max = 50: 1·50 + ½(2−1)(50+50) + ½(3−2)(50 + 46·e^{-3·(1−46/50)})
    #   = 50 + 50 + ½(50 + 46·0.786628) = 100 + 43.0924 = 143.092
    assert s["SFT base"]["aup"][0] == pytest.approx(143.092, abs=1e-2)
    table = method_table(s, 0.9)
    lines = table.splitlines()
    assert lines[0].startswith("| method | acc % @ φ=0.9 | TPF @ φ=0.9 | AUP |")
    row = next(line for line in lines if line.startswith("| LightningRL"))
    assert "| 49.0 ± 1.0 | 5.00 ± 1.00 |" in row
    assert "| -1.0 | 2.50 |" in row  # Δacc vs base = 49 − 50; TPF × base = 5 / 2
    assert "| - | – | -1.0 |" in row  # no styles, and no sound-steps figure where the task has no check
    results["LightningRL"][0][1]["sound_accuracy"] = 40.0
    results["LightningRL"][1][1]["sound_accuracy"] = 44.0
    row = next(line for line in method_table(summarize(results, 0.9), 0.9).splitlines() if "LightningRL" in line)
    assert "| 42.0 ± 2.0 | -1.0 |" in row
    assert "over 2 seed(s)" in table


def test_merge_runs_concatenates_seeds(tmp_path):
    from bench_method import merge_runs, write_outputs

    base, rl0, rl1 = _pts(50, 2.0, 50, 46, 3.0), _pts(50, 4.0, 50, 50, 6.0), _pts(50, 6.0, 48, 46, 7.0)
    run0 = {"results": {"SFT base": [base], "LightningRL": [rl0]}, "timings_s": {"LightningRL": [10.0]},
            "seeds": [0], "select_threshold": 0.9}
    run1 = {"results": {"SFT base": [base], "LightningRL": [rl1]}, "timings_s": {"LightningRL": [12.0]},
            "seeds": [1], "select_threshold": 0.9}
    merged = merge_runs([run0, run1])
    assert merged["seeds"] == [0, 1] and merged["results"]["LightningRL"] == [rl0, rl1]
    assert merged["timings_s"] == {"LightningRL": [10.0, 12.0]}
    table = write_outputs(merged, tmp_path)  # the same numbers as test_method_table_numbers
    assert "| 49.0 ± 1.0 | 5.00 ± 1.00 |" in table and "over 2 seed(s)" in table
    assert (tmp_path / "method.json").exists() and (tmp_path / "method.png").exists()
    with pytest.raises(ValueError, match="LightningRL appears twice for seeds"):
        merge_runs([run0, run0])
    # ablations run later with the same seeds join their seed's run (the base must agree)
    abl0 = {"results": {"SFT base": [base], "no NLL": [rl1]}, "seeds": [0], "select_threshold": 0.9}
    abl1 = {"results": {"SFT base": [base], "no NLL": [rl0]}, "seeds": [1], "select_threshold": 0.9}
    joined = merge_runs([run0, run1, abl0, abl1])
    assert joined["seeds"] == [0, 1] and joined["results"]["no NLL"] == [rl1, rl0]
    assert joined["results"]["SFT base"] == [base, base]
    with pytest.raises(ValueError, match="disagree on the SFT base"):
        merge_runs([run0, {**abl0, "results": {"SFT base": [rl0], "no NLL": [rl1]}}])
    with pytest.raises(ValueError, match="runs disagree on select_threshold"):
        merge_runs([run0, {**run1, "select_threshold": 0.7}])
    with pytest.raises(ValueError, match="not run for every seed"):
        merge_runs([run0, {**run1, "results": {"SFT base": [base]}}])


def test_bench_train_args(monkeypatch, tmp_path):
    """Method args, --fit-arg extras and config overlays reach `lrl fit`; a method's filter comes after (and so
    overrides) the benchmark's paper filter; no callbacks."""
    import bench_method

    import lrl.cli

    seen = []

    class _Result:
        class model:
            policy = "policy"

    monkeypatch.setattr(lrl.cli, "cli_main", lambda args: seen.append(args) or _Result)
    extra = [*bench_method.METHODS["GRPO(traj)"], "--model.init_args.lr=1e-5"]
    assert bench_method.train(extra, 3, 7, tmp_path, ["a.yaml", "b.yaml"]) == "policy"
    args = seen[0]
    assert args[:5] == ["fit", "--config", "a.yaml", "--config", "b.yaml"]
    assert "--seed_everything=3" in args and "--model.init_args.max_rl_steps=7" in args
    assert "--model.init_args.lr=1e-5" in args and "--model.init_args.loss.nll_weight=0.0" in args
    filters = [a for a in args if a.startswith("--data.init_args.filter=")]
    assert "tpf_range_threshold: 0.01" in filters[0] and "tpf_range_threshold: null" in filters[-1]
    assert [a for a in args if a.startswith("--trainer.callbacks")] == ["--trainer.callbacks=[]"]


def test_demo_before_after_table():
    from demo import before_after_table

    from lrl.evaluation import ParetoPoint, ParetoResult

    def res(acc9, tpf9, a):
        pts = [ParetoPoint("static_1tok", None, 60.0, 1.0, 10, 10, 2, 0.1, 5),
               ParetoPoint("dynamic@0.9", 0.9, acc9, tpf9, 10, 5, 2, 0.1, 5)]
        return ParetoResult(points=pts, aup=a, y_max=60.0)

    table = before_after_table(res(60.0, 2.0, 100.0), res(60.0, 5.0, 250.0), select=0.9)
    assert "| TPF @ φ=0.9 | 2.00 | 5.00 | 2.50× |" in table
    assert "| AUP over the sweep | 100.0 | 250.0 | 2.50× |" in table
    # all points, y_max 60: 60 + ½·(2 − 1)·(60 + 60) = 120 before; 60 + ½·(5 − 1)·120 = 300 after
    assert "| AUP, all points (no 5-point drop rule) | 120.0 | 300.0 | 2.50× |" in table
    assert "static_1tok: acc % / TPF | 60.0 / 1.00 | 60.0 / 1.00" in table


def test_bench_forward_tiny_on_cpu(tmp_path):
    """The forward-cost script runs end to end at the tiny shape (its GPU figures are in the README)."""
    import json

    import bench_forward

    out = tmp_path / "fwd.json"
    res = bench_forward.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--rows", "2",
                              "--prompt-len", "16", "--block-size", "8", "--train-len", "32", "--train-copies", "2",
                              "--warmup", "0", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    # by hand: embeddings + head 2·64·128, per layer attention 49152 + QK-norms 64 + MLP 147456 + norms 256, final norm
    assert res["params"] == 2 * 64 * 128 + 2 * (49152 + 64 + 147456 + 256) + 128
    # 2 copies split each response block's positions in two: every response token is a target exactly once
    assert res["train_tokens"] == 32 - 16
    assert all(res[k] > 0 for k in ("prefill_ms", "block_forward_ms", "train_fwd_bwd_ms"))


def test_method_table_forwards_styles_and_phases(tmp_path):
    """The issue-12 columns: forwards per response (and its ratio to the base), style shares, phase timings."""
    from bench_method import method_table, phase_table, plot_styles, summarize

    def pts(fwd, padded):
        p = _pts(50, 4.0, 50, 46, 3.0)
        for q in p:
            q.update(forwards_per_response=fwd, tokens_per_response=30.0,
                     styles={"chain": 1 - padded, "padded": padded, "other": 0.0})
        return p

    results = {"SFT base": [pts(8.0, 0.0)] * 2, "LightningRL": [pts(4.0, 1.0), pts(6.0, 0.5)]}
    table = method_table(summarize(results, 0.9), 0.9)
    row = next(line for line in table.splitlines() if line.startswith("| LightningRL"))
    assert "| 5.00 ± 1.00 | 30.0 | chain 25% padded 75% |" in row  # forwards mean ± std; styles averaged
    assert row.endswith("| 0.62 | 1.00 |")  # forwards × base = 5 / 8; AUP × base
    curves = {"LightningRL": [
        {"timing/rollout_s": [2.0, 4.0], "timing/train_s": [1.0, 1.0], "rollout/forwards_per_response": [8.0, 4.0],
         "rollout/distinct_texts_per_group": [3.0, 5.0], "style/chain": [1.0, 0.0], "style/padded": [0.0, 1.0],
         "rollout/tpf_var_between_texts_correct": [0.1, 0.3]},
        {"timing/rollout_s": [6.0], "timing/train_s": [3.0], "rollout/forwards_per_response": [6.0],
         "rollout/distinct_texts_per_group": [1.0], "style/chain": [0.5], "style/padded": [0.5],
         "rollout/tpf_var_between_texts_correct": [0.6]},
    ]}
    phases = phase_table(curves)
    # rollout: mean of per-run means (3 and 6); reward never logged; forwards first (8, 6) → last (4, 6); the
    # between-text variance share: mean of run means 0.2 and 0.6
    assert "| LightningRL | 4.50 | nan | 2.00 | 7.00 → 5.00 | 2.00 → 3.00 | 0.40 |" in phases
    del curves["LightningRL"][0]["rollout/tpf_var_between_texts_correct"], curves["LightningRL"][1][
        "rollout/tpf_var_between_texts_correct"]
    assert phase_table(curves).splitlines()[-1].endswith("| 2.00 → 3.00 | - |")  # runs from before the diagnostic
    # 16 steps: the last eighth is the last 2 (6 and 4: 5.00), not the last step alone
    long = {"LightningRL": [{"rollout/forwards_per_response": [10.0] * 14 + [6.0, 4.0],
                             "rollout/distinct_texts_per_group": [3.0] * 15 + [1.0]}]}
    assert "| 10.00 → 5.00 | 3.00 → 2.00 |" in phase_table(long)
    plot_styles(curves, tmp_path / "styles.png")
    assert (tmp_path / "styles.png").stat().st_size > 0
    from bench_method import plotted_styles

    # two styles: one line (its complement is the other); three (one seen only briefly): every one of them
    assert plotted_styles({"style/chain", "style/pairs", "style/other", "timing/train_s"}) == ["style/pairs"]
    assert plotted_styles({"style/chain", "style/pairs", "style/padded", "style/other"}) == [
        "style/chain", "style/padded", "style/pairs"]


def test_rl_runs_count_rl_steps_in_the_progress_bar(tiny_checkpoint, tmp_path, monkeypatch):
    """RL configs get `RLProgressBar` (total = max_rl_steps) instead of Lightning's per-epoch batch bar; the SFT
    config keeps Lightning's; a disabled bar stays disabled."""
    from callbacks import RLProgressBar
    from lrl.cli import cli_main

    monkeypatch.chdir(tmp_path)
    common = ["--checkpoint", str(tiny_checkpoint), "--block_size", "4"]
    rl = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *common], run=False)
    assert isinstance(rl.trainer.progress_bar_callback, RLProgressBar)
    assert rl.trainer.progress_bar_callback._total(rl.model) == rl.model.hparams.max_rl_steps
    off = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), *common,
                    "--trainer.enable_progress_bar=false"], run=False)
    assert off.trainer.progress_bar_callback is None
    sft = cli_main(["--config", str(ROOT / "configs" / "sft_tiny.yaml"), *common], run=False)
    assert sft.trainer.progress_bar_callback is not None
    assert not isinstance(sft.trainer.progress_bar_callback, RLProgressBar)


def test_in_process_cli_from_a_script_with_its_own_arguments_warns_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    """Scripts (build_base, bench_method) call `cli_main(args)` while sys.argv holds their own options: LightningCLI's
    "args and command line" warning is expected there and filtered, like the other warnings our design triggers."""
    import warnings

    from lrl.cli import cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["build_base.py", "--skip-train"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(tiny_checkpoint),
                  "--block_size", "4"], run=False)
    assert not [w for w in caught if "args parameter" in str(w.message)], [str(w.message) for w in caught]


def test_aup_all_points_column_keeps_points_past_the_drop_line():
    """d3LLM's AUP drops a point > 5 points below the 1-token point; the extra column keeps it (hand numbers)."""
    from bench_method import summarize

    pts = [{"setting": "static_1tok", "threshold": None, "accuracy": 50.0, "tpf": 1.0},
           {"setting": "dynamic@0.9", "threshold": 0.9, "accuracy": 40.0, "tpf": 2.0}]
    s = summarize({"SFT base": [pts]}, 0.9)["SFT base"]
    assert s["aup"] == [pytest.approx(50.0)]  # only the first point survives the rule
    # 50 + ½·(2 − 1)·(50 + 40·e^{−3·(1 − 40/50)}) = 50 + ½·(50 + 21.9525) = 85.976
    assert s["aup_all_points"] == [pytest.approx(85.976, abs=1e-3)]
