"""Bad configs, checkpoints and data files: `lrl` exits 2 with one short message naming the key as the user wrote
it, prints no traceback, and writes nothing to the output folder (`lrl.cli_errors`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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
    out.update(_mismatched_checkpoints(tmp))
    _lightning_checkpoints(tmp)
    return out


def _mismatched_checkpoints(tmp: Path) -> dict[str, Path]:
    """Copies of the tiny base whose config.json and weights disagree, or whose weights are unusable."""
    import torch
    from safetensors.torch import load_file, save_file

    def variant(name, config=None, weights=None):
        d = tmp / name
        shutil.copytree(BASE, d)
        if config:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(config)
            (d / "config.json").write_text(json.dumps(cfg))
        if weights:
            sd = load_file(d / "model.safetensors")
            weights(sd)
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        return d

    gate = "model.layers.0.mlp.gate_proj.weight"
    return {
        "cfg_vocab": variant("cfg_vocab", {"vocab_size": 61}),
        "cfg_hidden": variant("cfg_hidden", {"hidden_size": 64}),
        "cfg_layers": variant("cfg_layers", {"num_hidden_layers": 3}),
        "w_missing": variant("w_missing", weights=lambda sd: sd.pop(gate)),
        "w_extra": variant("w_extra", weights=lambda sd: sd.update({"model.extra.weight": torch.zeros(2)})),
        "w_int": variant("w_int", weights=lambda sd: sd.update({gate: sd[gate].to(torch.int32)})),
        "w_nan": variant("w_nan", weights=lambda sd: sd[gate].view(-1)[3:5].fill_(float("nan"))),
        "w_inf": variant("w_inf", weights=lambda sd: sd[gate].view(-1)[0:1].fill_(float("inf"))),
        "w_shape": variant("w_shape", weights=lambda sd: sd.update({gate: sd[gate][:-1].clone()})),
    }


def _lightning_checkpoints(tmp: Path) -> None:
    """Lightning-style .ckpt files of the tiny base (policy weights + the hparams a resume compares), one defect
    each, and broken files to pass as --ckpt_path."""
    import torch
    from safetensors.torch import load_file

    sd = {f"policy.model.{k}": v for k, v in load_file(BASE / "model.safetensors").items()}
    model_hp = {"checkpoint": str(BASE), "block_size": 8}
    data_hp = {"group_size": 8, "task": "synthetic", "checkpoint": str(BASE), "block_size": 8}

    def save(name, state=sd, model=model_hp, data=data_hp):
        torch.save({"state_dict": state, "hyper_parameters": model, "datamodule_hyper_parameters": data,
                    "pytorch-lightning_version": "2.5.0"}, tmp / name)

    other = dict(sd)
    other["policy.model.model.embed_tokens.weight"] = torch.zeros(96, 128)
    save("other_model.ckpt", state=other)
    save("no_policy.ckpt", state={"policy.head.weight": torch.zeros(2)})
    save("resume_group.ckpt", data={**data_hp, "group_size": 4})
    save("resume_block.ckpt", model={**model_hp, "block_size": 16})
    save("resume_task.ckpt", data={**data_hp, "task": "gsm8k"})
    save("resume_base.ckpt", model={**model_hp, "checkpoint": str(tmp / "another_base")})
    save("flat_loss.ckpt", model={**model_hp, "kl_beta": 0.01, "nll_weight": 0.1})  # before model.init_args.loss
    torch.save({"weights": 1}, tmp / "not_lightning.ckpt")
    save("good.ckpt")
    raw = (tmp / "good.ckpt").read_bytes()
    (tmp / "truncated.ckpt").write_bytes(raw[: len(raw) // 2])
    (tmp / "text.ckpt").write_text("this is not a checkpoint\n")


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
    ("eps_low", ["--model.init_args.loss.eps_low=1.5"], "model.init_args.loss.eps_low must be in [0, 1)"),
    ("micro_batch_size", ["--model.init_args.micro_batch_size=0"], "model.init_args.micro_batch_size must be > 0"),
    ("kl_beta", ["--model.init_args.loss.kl_beta=-0.1"], "model.init_args.loss.kl_beta must be >= 0"),
    ("tis_cap", ["--model.init_args.loss.tis_cap=0"], "model.init_args.loss.tis_cap must be > 0"),
    ("tis_single_pass", ["--model.init_args.loss.tis_cap=2.0", "--model.init_args.estimator=single_pass"],
     "model.init_args.loss.tis_cap needs model.init_args.estimator=trajectory"),
    ("loss_old_key", ["--model.init_args.nll_weight=0.0"], "model.init_args.nll_weight: Option 'nll_weight'"),
    ("reward_old_key", ["--data.init_args.tpf_coefficient=0.0"],
     "data.init_args.tpf_coefficient: Option 'tpf_coefficient' is not accepted; moved to data.init_args.rewards"),
    ("filter_callback", ["--trainer.callbacks=[{class_path: callbacks.TPFAwareFilter}]"],
     "moved to data.init_args.filter: docs/rl_step.md"),
    ("prompts_per_step", ["--data.init_args.prompts_per_step=0"], "data.init_args.prompts_per_step must be >= 1"),
    ("block_size", ["--block_size=0"], "block_size must be > 0"),
    ("eval_thresholds", ["--model.init_args.eval.thresholds=[2.0]"], "model.init_args.eval.thresholds"),
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

# issue 30: the groups an audit found unrefused (tracebacks, silently accepted, files left), our own cases
D, M, R = "--data.init_args.", "--model.init_args.", "--data.init_args.rollout."
SGLANG = [f"{R}kind=sglang"]
CASES_30_SAMPLING = [
    ("temperature_0", [f"{D}temperature=0"], "data.init_args.temperature must be > 0"),
    ("temperature_neg", [f"{D}temperature=-1.0"], "data.init_args.temperature must be > 0"),
    ("max_new_tokens_0", [f"{D}max_new_tokens=0"], "data.init_args.max_new_tokens must be >= 1"),
    ("max_new_tokens_neg", [f"{D}max_new_tokens=-8"], "data.init_args.max_new_tokens must be >= 1"),
    ("max_new_tokens_huge", [f"{D}max_new_tokens=4096"], "data.init_args.max_new_tokens=4096 exceeds the context"),
    ("top_p_high", [f"{D}top_p=1.5"], "data.init_args.top_p must be in (0, 1]"),
    ("top_p_zero", [f"{D}top_p=0"], "data.init_args.top_p must be in (0, 1]"),
    ("top_k_neg", [f"{D}top_k=-1"], "data.init_args.top_k must be >= 0"),
    ("denoising_neg", [f"{D}denoising_steps=-1"], "data.init_args.denoising_steps must be >= 1"),
    ("denoising_0", [f"{D}denoising_steps=0"], "data.init_args.denoising_steps must be >= 1"),
    ("max_rows_0", [f"{R}max_rows=0"], "data.init_args.rollout.max_rows must be an int >= 1"),
    ("max_rows_neg", [f"{R}max_rows=-3"], "data.init_args.rollout.max_rows must be an int >= 1"),
    ("dtype_bogus", [f"{R}dtype=bogus"], "data.init_args.rollout.dtype must be a floating-point torch dtype"),
    ("dtype_int", [f"{R}dtype=int8"], "data.init_args.rollout.dtype must be a floating-point torch dtype"),
    ("kv_cache_gb_0", [f"{R}kv_cache_gb=0"], "data.init_args.rollout.kv_cache_gb must be > 0"),
    ("transient_gb_neg", [f"{R}transient_gb=-1"], "data.init_args.rollout.transient_gb must be > 0"),
    ("sglang_no_urls", SGLANG, "data.init_args.rollout.urls is empty"),
    ("sglang_not_url", [*SGLANG, f"{R}urls=[localhost-30000]"], "'localhost-30000' is not an http(s):// URL"),
    ("sglang_unreachable", [*SGLANG, f"{R}urls=[http://127.0.0.1:9]"], "cannot reach http://127.0.0.1:9"),
    ("rollout_kind", [f"{R}kind=vllm"], "kind"),
    ("planner_no_head", [f"{D}remasking_strategy=planner"], "data.init_args.remasking_strategy=planner needs a "
                                                            "planner head"),
]
CASES_30_KNOBS = [
    ("warmup_neg", [f"{M}warmup_steps=-1"], "model.init_args.warmup_steps must be >= 0"),
    ("grad_norm_neg", [f"{M}max_grad_norm=-1"], "model.init_args.max_grad_norm must be >= 0"),
    ("weight_decay_neg", [f"{M}weight_decay=-0.1"], "model.init_args.weight_decay must be >= 0"),
    ("adam_eps_0", [f"{M}adam_eps=0"], "model.init_args.adam_eps must be > 0"),
    ("skipped_neg", [f"{M}max_skipped_steps=-1"], "model.init_args.max_skipped_steps must be >= 0"),
    ("eval_tokens_huge", [f"{M}eval.max_new_tokens=1024"], "model.init_args.eval.max_new_tokens=1024 exceeds"),
    ("eval_size_neg", [f"{D}eval_size=-5"], "data.init_args.eval_size must be >= 1"),
    ("eval_size_0", [f"{D}eval_size=0"], "data.init_args.eval_size must be >= 1"),
    ("steps_per_epoch_0", [f"{D}steps_per_epoch=0"], "data.init_args.steps_per_epoch must be >= 1"),
    ("max_prompt_tokens_0", [f"{D}max_prompt_tokens=0"], "data.init_args.max_prompt_tokens must be >= 1"),
    ("stop_id_vocab", [f"{D}stop_token_ids=[100000]"], "data.init_args.stop_token_ids [100000] lie outside the "
                                                       "vocabulary"),
    ("stop_id_neg", [f"{D}stop_token_ids=[-1]"], "data.init_args.stop_token_ids must be token ids >= 0"),
    ("freeze_no_head", [f"{M}freeze_backbone=true"], "model.init_args.freeze_backbone=true trains the planner head"),
    ("planner_eval_no_head", [f"{M}eval.planner_thresholds=[0.5]"], "model.init_args.eval.planner_thresholds needs"),
    ("split_too_small", [f"{D}task_kwargs={{num_train: 4, num_eval: 4, family: sums, styles: {{chain: 1.0}}}}"],
     "data.init_args.prompts_per_step=8 × 1 rank(s) needs at least 8 training prompts"),
]
CASES_30_WEIGHTS = [
    ("cfg_vocab", ["--checkpoint=TMP/cfg_vocab"], "weight lm_head.weight has shape [60, 128] but config.json "
                                                  "describes [61, 128]"),
    ("cfg_hidden", ["--checkpoint=TMP/cfg_hidden"], "but config.json describes"),
    ("cfg_layers", ["--checkpoint=TMP/cfg_layers"], "config.json does not describe a valid qwen3 model"),
    ("w_missing", ["--checkpoint=TMP/w_missing"], "lacks 1 weight(s) of the model its config.json describes"),
    ("w_extra", ["--checkpoint=TMP/w_extra"], "holds 1 weight(s) its config.json's model does not have"),
    ("w_int", ["--checkpoint=TMP/w_int"], "model.layers.0.mlp.gate_proj.weight is I32, not a floating-point"),
    ("w_nan", ["--checkpoint=TMP/w_nan"], "model.layers.0.mlp.gate_proj.weight holds NaN or infinite values"),
    ("w_inf", ["--checkpoint=TMP/w_inf"], "holds NaN or infinite values"),
    ("w_shape", ["--checkpoint=TMP/w_shape"], "gate_proj.weight has shape [383, 128]"),
]
CASES_30_CKPT_PATH = [
    ("ckpt_missing", ["--ckpt_path=TMP/none.ckpt"], "--ckpt_path: TMP/none.ckpt does not exist"),
    ("ckpt_text", ["--ckpt_path=TMP/text.ckpt"], "--ckpt_path: TMP/text.ckpt is not a Lightning checkpoint"),
    ("ckpt_truncated", ["--ckpt_path=TMP/truncated.ckpt"], "TMP/truncated.ckpt is not a Lightning checkpoint"),
    ("ckpt_not_lightning", ["--ckpt_path=TMP/not_lightning.ckpt"], "is not a Lightning checkpoint (no state_dict)"),
    ("ckpt_other_model", ["--ckpt_path=TMP/other_model.ckpt"], "is a checkpoint of another model: "
                                                               "model.embed_tokens.weight has shape [96, 128]"),
    ("ckpt_no_policy", ["--ckpt_path=TMP/no_policy.ckpt"], "holds no policy weights of the model"),
    ("resume_group_size", ["--ckpt_path=TMP/resume_group.ckpt"], "data.init_args.group_size: resuming"),
    ("resume_block_size", ["--ckpt_path=TMP/resume_block.ckpt"], "block_size: resuming"),
    ("resume_task", ["--ckpt_path=TMP/resume_task.ckpt"], "data.init_args.task: resuming"),
    ("resume_base", ["--ckpt_path=TMP/resume_base.ckpt"], "checkpoint: resuming"),
    ("resume_flat_loss", ["--ckpt_path=TMP/flat_loss.ckpt"], "TMP/flat_loss.ckpt was saved before the loss knobs "
                                                             "became model.init_args.loss (its hyperparameters hold "
                                                             "kl_beta, nll_weight at the top level)"),
    ("validate_text", ["VALIDATE", "--ckpt_path=TMP/text.ckpt"], "TMP/text.ckpt is not a Lightning checkpoint"),
    ("validate_other_model", ["VALIDATE", "--ckpt_path=TMP/other_model.ckpt"], "is a checkpoint of another model"),
    ("validate_nan_base", ["VALIDATE", "--checkpoint=TMP/w_nan"], "holds NaN or infinite values"),
]
CASES += CASES_30_SAMPLING + CASES_30_KNOBS + CASES_30_WEIGHTS + CASES_30_CKPT_PATH


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
    args = _base_args(out)
    if extra[:1] == ["VALIDATE"]:
        args, extra = ["validate", *args[1:]], extra[1:]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(args + [a.replace("TMP", str(tmp_path)) for a in extra])
    assert time.monotonic() - t0 < 60  # an unreachable rollout server is named within seconds, not minutes
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
