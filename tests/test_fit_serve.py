"""`lrl fit` with rollouts from an `lrl serve` process over HTTP, weights synced to it after every step."""

from __future__ import annotations

from pathlib import Path

import torch
from serve_utils import _start_server, _stop

from lrl.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_fit_with_rollouts_from_lrl_serve(tiny_checkpoint, tmp_path):
    proc, url = _start_server(tiny_checkpoint, tmp_path / "server.log", "--threshold", "0.9", "--block-size", "4")
    try:
        out = tmp_path / "run"
        cli = cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "quickstart.yaml"),
                "--config",
                str(ROOT / "configs" / "rollout" / "sglang.yaml"),
                "--checkpoint",
                str(tiny_checkpoint),
                "--block_size",
                "4",
                f"--data.init_args.rollout.urls=[{url}]",
                f"--data.init_args.rollout.sglang={{weight_sync: disk, sync_dir: {tmp_path}/sync, timeout_s: 120, "
                "health_timeout_s: 60, sync_dtype: float32}",
                "--data.init_args.prompts_per_step=2",
                "--data.init_args.group_size=2",
                "--data.init_args.max_new_tokens=8",
                "--data.init_args.task_kwargs={num_train: 20, num_eval: 4}",
                "--data.init_args.max_refill_rounds=1",
                "--model.init_args.minibatches=1",
                "--model.init_args.lr=1e-2",
                "--model.init_args.warmup_steps=0",
                "--model.init_args.max_rl_steps=2",
                f"--trainer.default_root_dir={out}",
                "--trainer.enable_progress_bar=false",
                f"--trainer.logger.init_args.save_dir={out}",
                "--trainer.callbacks=[{class_path: callbacks.TPFAwareFilter, init_args: {all_wrong: false, "
                "tpf_range_threshold: null}}, {class_path: callbacks.WeightSync}]",
            ]
        )
        gen = cli.datamodule.generator
        assert type(gen).__name__ == "SGLangRolloutGenerator"
        metrics = cli.trainer.logged_metrics
        assert float(metrics["weight_version"]) == 2.0
        assert float(metrics["rollout/weight_version"]) == 1.0  # step 2's rollout used the weights synced after step 1
        assert "timing/sync_s" in metrics and float(metrics["tpf/mean"]) >= 1.0
        # the server now serves the trained weights: its greedy output equals the trained policy's
        from lrl.rollout import NativeEngine, SamplingParams

        sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=8, threshold=0.9)
        local = NativeEngine(cli.model.policy.eval(), cli.model.tokenizer).generate(["Q: 2+2?\nA: "], sp)
        remote = gen.generate(["Q: 2+2?\nA: "], sp)
        assert remote.response_ids == local.response_ids
        assert torch.equal(remote.num_forwards, local.num_forwards)
    finally:
        _stop(proc)
