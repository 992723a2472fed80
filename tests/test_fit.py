"""End to end: a few `lrl fit` steps on the tiny model, resume equivalence, and the documented metric keys."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def _args(ckpt, out: Path, steps: int, *extra):
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--checkpoint",
        str(ckpt),
        "--block_size",
        "4",
        "--data.init_args.prompts_per_step=2",
        "--data.init_args.group_size=4",
        "--data.init_args.max_new_tokens=16",
        "--data.init_args.task_kwargs={num_train: 40, num_eval: 8}",
        "--data.init_args.eval_size=4",
        "--data.init_args.max_refill_rounds=1",
        "--model.init_args.minibatches=1",
        "--model.init_args.micro_batch_size=3",
        "--model.init_args.lr=1e-3",
        "--model.init_args.eval.max_new_tokens=8",
        "--model.init_args.eval.thresholds=[0.5]",
        f"--model.init_args.max_rl_steps={steps}",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}",
        *extra,
    ]


def _callbacks_override(out: Path) -> list[str]:
    # a random model is never correct: keep every group so the update is exercised
    return [
        "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",
        "--trainer.callbacks=["
        "{class_path: callbacks.RewardNormalizationLogger}, "
        f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, "
        "save_last: true, every_n_rl_steps: 1, keep_last: -1}}]",
    ]


def _run(ckpt, out, steps, *extra):
    return cli_main(_args(ckpt, out, steps) + _callbacks_override(out) + list(extra))


def _weights(module):
    return {k: v.detach().clone() for k, v in module.policy.model.state_dict().items()}


@pytest.fixture(scope="module")
def straight_run(peaky_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cli = _run(peaky_checkpoint, out, 4)
    return cli, out


def test_fit_changes_parameters_and_logs_documented_keys(straight_run, peaky_checkpoint):
    from lrl.models import load_checkpoint

    cli, out = straight_run
    init, _ = load_checkpoint(peaky_checkpoint)
    after = _weights(cli.model)
    changed = [k for k, v in init.model.state_dict().items() if not torch.allclose(v, after[k])]
    assert changed, "no parameter changed after 4 RL steps"
    keys = set(cli.trainer.logged_metrics)
    for key in (
        "loss/policy",
        "loss/kl",
        "loss/nll",
        "loss/total",
        "clip/low",
        "clip/high",
        "clip/ratio_mean",
        "kl",
        "entropy",
        "tpf/mean",
        "reward/total/mean",
        "reward/acc/mean",
        "reward/tpf/mean",
        "filter/kept",
        "filter/drawn",
        "timing/rollout_s",
        "timing/reward_s",
        "timing/train_s",
        "timing/sync_s",
        "weight_version",
        "adv/collapse@0.1",
        "reward/frac_zero_std",
        "rollout/logprob_abs_diff/mean",
        "rollout/logprob_abs_diff/max",
        "rollout/logprob_corr",
        "rollout/distinct_texts_per_group",
        "rollout/tpf_var_between_texts",
    ):
        assert key in keys, f"{key} not logged; got {sorted(keys)}"
    assert cli.trainer.logged_metrics["weight_version"] == 3.0  # step 4 rolled out with the weights of step 3
    # native rollouts score under the training distribution: the last step's mismatch is ~0
    assert float(cli.trainer.logged_metrics["rollout/logprob_abs_diff/max"]) < 1e-4
    assert glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)


def test_resume_matches_uninterrupted_run(straight_run, peaky_checkpoint, tmp_path):
    cli_full, _ = straight_run
    out = tmp_path / "resumed"
    _run(peaky_checkpoint, out, 2)
    assert (out / "ckpts" / "last.ckpt").exists()
    cli = _run(peaky_checkpoint, out, 4, "--ckpt_path", "last")
    a, b = _weights(cli_full.model), _weights(cli.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"weights differ at {k}")
    assert cli.datamodule.state_dict() == cli_full.datamodule.state_dict()
    for key in ("loss/policy", "tpf/mean", "reward/total/mean"):
        assert float(cli.trainer.logged_metrics[key]) == float(cli_full.trainer.logged_metrics[key])


def test_resume_without_checkpoint_is_an_error(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        _run(tiny_checkpoint, tmp_path / "fresh", 2, "--ckpt_path", "last")
