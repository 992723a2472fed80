"""Bad configs, checkpoints and data files: `lrl` exits 2 with one short message naming the key as the user wrote
it, prints no traceback, and writes nothing to the output folder (`lrl.cli_errors`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "outputs" / "base" / "sft_tiny"


def _bad_checkpoints(tmp: Path) -> dict[str, Path]:
    """Broken copies of the committed tiny base, one defect each."""
    out = {}
    for name in ("no_config", "bad_json", "no_weights", "truncated", "shard_missing"):
        d = tmp / name
        shutil.copytree(BASE, d)
        out[name] = d
    (out["no_config"] / "config.json").unlink()
    (out["bad_json"] / "config.json").write_text('{"model_type": "sdar",')
    (out["no_weights"] / "model.safetensors").unlink()
    w = out["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (out["shard_missing"] / "model.safetensors").rename(out["shard_missing"] / "model-00001-of-00002.safetensors")
    (out["shard_missing"] / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return out


def _data_files(tmp: Path) -> dict[str, Path]:
    good = {"question": "1+1?", "answer": "#### 2"}
    files = {"missing_field": tmp / "rows.jsonl", "not_json": tmp / "broken.jsonl"}
    files["missing_field"].write_text(json.dumps(good) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    files["not_json"].write_text(json.dumps(good) + "\n{not json\n")
    return files


# the quickstart checks the synthetic task's worked steps; GSM8K has none to check
GSM = ["--data.init_args.task=gsm8k", "--data.init_args.task_kwargs={}", "--data.init_args.eval_seed=null",
       "--data.init_args.require_worked_steps=false"]

# (id, extra arguments (TMP is replaced by the test's folder), text the one-line message must contain)
CASES = [
    ("group_size", ["--data.init_args.group_size=1"], "data.init_args.group_size must be >= 2"),
    ("lr", ["--model.init_args.lr=-1"], "model.init_args.lr must be > 0"),
    ("eps_low", ["--model.init_args.eps_low=1.5"], "model.init_args.eps_low must be in [0, 1)"),
    ("micro_batch_size", ["--model.init_args.micro_batch_size=0"], "model.init_args.micro_batch_size must be > 0"),
    ("kl_beta", ["--model.init_args.kl_beta=-0.1"], "model.init_args.kl_beta"),
    ("prompts_per_step", ["--data.init_args.prompts_per_step=0"], "data.init_args.prompts_per_step must be >= 1"),
    ("block_size", ["--block_size=0"], "block_size must be > 0"),
    ("eval_thresholds", ["--model.init_args.eval_thresholds=[2.0]"], "model.init_args.eval_thresholds"),
    ("threshold", ["--data.init_args.threshold=1.5"], "data.init_args.threshold must be in [0, 1]"),
    ("whole_blocks", ["--data.init_args.max_new_tokens=7"], "data.init_args.max_new_tokens=7 must be a multiple"),
    ("unknown_key", ["--model.init_args.learning_rate=1"], "model.init_args.learning_rate: Option 'learning_rate'"),
    ("bad_literal", ["--model.init_args.estimator=bogus"], "model.init_args.estimator: Expected a typing.Literal"),
    ("bad_int", ["--trainer.max_steps=abc"], "trainer.max_steps: Expected a <class 'int'>"),
    ("unknown_task", ["--data.init_args.task=nope"], "data.init_args.task: unknown task 'nope'"),
    ("task_kwargs", ["--data.init_args.task_kwargs={bogus: 1}"], "data.init_args.task_kwargs: task 'synthetic'"),
    ("eval_seed", ["--data.init_args.task=gsm8k", "--data.init_args.task_kwargs={}"], "data.init_args.eval_seed"),
    ("every_n_rl_steps", ["--trainer.callbacks=[{class_path: callbacks.RLCheckpoint, init_args: "
                          "{every_n_rl_steps: -1}}]"], "RLCheckpoint.every_n_rl_steps must be an int >= 0"),
    ("missing_config", ["--config=TMP/nope.yaml"], "config: File does not exist"),
    ("ckpt_path_last", ["--ckpt_path=last"], "--ckpt_path last: no checkpoint in"),
    ("checkpoint_missing", ["--checkpoint=TMP/nowhere"], "checkpoint: TMP/nowhere does not exist"),
    ("checkpoint_no_config", ["--checkpoint=TMP/no_config"], "checkpoint: TMP/no_config has no config.json"),
    ("checkpoint_bad_json", ["--checkpoint=TMP/bad_json"], "checkpoint: TMP/bad_json/config.json is not valid JSON"),
    ("checkpoint_no_weights", ["--checkpoint=TMP/no_weights"], "checkpoint: TMP/no_weights holds no weights"),
    ("checkpoint_truncated", ["--checkpoint=TMP/truncated"], "model.safetensors is truncated or corrupt"),
    ("checkpoint_shard", ["--checkpoint=TMP/shard_missing"], "lacks weight shard(s) ['model-00002-of-00002"),
    ("cuda_graphs_on_cpu", ["--data.init_args.rollout.cuda_graphs=true"],
     "data.init_args.rollout.cuda_graphs=true needs the policy on a CUDA device (the trainer runs on cpu)"),
    ("worked_steps_check", GSM[:3], "data.init_args.require_worked_steps=true but task 'gsm8k' has no check"),
    ("data_file_missing", [*GSM[:1], "--data.init_args.task_kwargs={source: TMP/none.jsonl}", *GSM[2:]],
     "dataset file not found: TMP/none.jsonl"),
    ("data_row_field", [*GSM[:1], "--data.init_args.task_kwargs={source: TMP/rows.jsonl}", *GSM[2:]],
     "TMP/rows.jsonl: gsm8k: record 1 has no field 'answer'"),
    ("data_not_json", [*GSM[:1], "--data.init_args.task_kwargs={source: TMP/broken.jsonl}", *GSM[2:]],
     "TMP/broken.jsonl: line 2 is not valid JSON"),
]


def _base_args(out: Path) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(BASE), "--block_size=8",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--model.init_args.max_rl_steps=1", "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("extra, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(extra, expected, tmp_path, monkeypatch, capsys):
    _bad_checkpoints(tmp_path)
    _data_files(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the config's relative outputs/ paths land here
    monkeypatch.delenv("LRL_DEBUG", raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(_base_args(out) + [a.replace("TMP", str(tmp_path)) for a in extra])
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("lrl: error: ")]
    assert len(lines) == 1, err[-3000:]
    assert expected.replace("TMP", str(tmp_path)) in lines[0], lines[0]
    after = err[err.index("lrl: error: "):].splitlines()
    assert len(after) <= 7, after  # a short block at most
    assert not out.exists() and not list(work.iterdir())  # nothing written before the input was validated


def test_real_process_and_debug_switch(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LRL_DEBUG", None)
    args = [*_base_args(tmp_path / "out"), "--data.init_args.group_size=1"]
    proc = subprocess.run([sys.executable, "-m", "lrl.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "lrl: error: data.init_args.group_size must be >= 2" in proc.stderr
    monkeypatch.setenv("LRL_DEBUG", "1")  # asked for: the exception itself, with its traceback
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        main(args)


def test_errors_after_setup_keep_their_traceback(monkeypatch):
    from lrl import cli_errors

    cli_errors.reset()
    assert cli_errors.is_user_error(ValueError("x"))
    cli_errors.RunStarted().on_fit_start(None, None)
    assert not cli_errors.is_user_error(ValueError("a bug during training"))
    cli_errors.reset()
    assert not cli_errors.is_user_error(RuntimeError("not input"))


def test_help_says_what_lrl_is_and_predict_is_gone(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "LightningRL" in out and "lrl serve" in out and "{fit,validate,test}" in out and "predict" not in out
    with pytest.raises(SystemExit) as info:
        main(["predict", "--config", str(ROOT / "configs" / "quickstart.yaml")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "invalid choice: 'predict'" in err and "Traceback" not in err
