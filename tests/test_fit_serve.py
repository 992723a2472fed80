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
                "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}", "--trainer.callbacks=[]",
            ]
        )
        gen = cli.datamodule.generator
        assert type(gen).__name__ == "SGLangRolloutGenerator"
        metrics = cli.trainer.logged_metrics
        # step 2 synced the weights of RL step 1 before its rollout, and the rollout used them
        assert float(metrics["weight_version"]) == 1.0 and float(metrics["rollout/weight_version"]) == 1.0
        assert "timing/sync_s" in metrics and float(metrics["tpf/mean"]) >= 1.0
        cli.datamodule.sync_generator()  # after training: the trained weights of RL step 2
        assert gen.weight_version == 2
        # the server now serves the trained weights: its greedy output equals the trained policy's
        from lrl.rollout import NativeEngine, SamplingParams

        sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=8, threshold=0.9)
        local = NativeEngine(cli.model.policy.eval(), cli.model.tokenizer).generate(["Q: 2+2?\nA: "], sp)
        remote = gen.generate(["Q: 2+2?\nA: "], sp)
        assert remote.response_ids == local.response_ids
        assert torch.equal(remote.num_forwards, local.num_forwards)
    finally:
        _stop(proc)


def test_ddp_ranks_share_one_server(tiny_checkpoint, tmp_path):
    """2 DDP ranks roll out from one `lrl serve`: rank 0 pushes each new version, rank 1 adopts it; the server ends
    with the ranks' final weights."""
    import httpx
    from fit_utils import run_two_rank_fit

    log = tmp_path / "server.log"
    proc, url = _start_server(tiny_checkpoint, log, "--threshold", "0.9", "--block-size", "4", "--log-level", "info")
    try:
        out = tmp_path / "run"
        run_two_rank_fit(
            tiny_checkpoint,
            out,
            "--trainer.strategy=ddp",
            f"--data.init_args.rollout.urls=[{url}]",
            f"--data.init_args.rollout.sglang={{weight_sync: disk, sync_dir: {tmp_path}/sync, timeout_s: 120, "
            "health_timeout_s: 60, sync_dtype: float32}",
            "--data.init_args.task_kwargs={num_train: 20, num_eval: 4}",
            "--model.init_args.minibatches=1",
            "--model.init_args.max_rl_steps=2",
            "--trainer.enable_checkpointing=false",
            "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",
            "--trainer.callbacks=["
            f"{{class_path: ddp_dump.DumpWeights, init_args: {{out: {out}/weights}}}}]",
            configs=("quickstart.yaml", "rollout/sglang.yaml"),
        )
        # initial sync (version 0), step 2's (version 1) and the dump callback's after training (version 2), each
        # pushed once (by rank 0), not once per rank
        assert httpx.get(f"{url}/get_model_info", timeout=30).json()["weight_version"] == "2"
        pushes = [line for line in log.read_text().splitlines() if "POST /update_weights_from_disk" in line]
        assert len(pushes) == 3, pushes
        a, b = (torch.load(out / "weights" / f"rank{r}.pt")["weights"] for r in (0, 1))
        from lrl.models import load_checkpoint
        from lrl.rollout import NativeEngine, SamplingParams

        lm, tok = load_checkpoint(tiny_checkpoint)
        lm.model.load_state_dict(a)
        for name, tensor in a.items():
            torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=f"ranks diverged at {name}")
        sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=8, threshold=0.9)
        from lrl.rollout.sglang_client import SGLangRolloutGenerator

        remote = SGLangRolloutGenerator([url], str(tiny_checkpoint), health_timeout_s=60)
        assert remote.generate(["Q: 2+2?\nA: "], sp).response_ids == \
            NativeEngine(lm.eval(), tok).generate(["Q: 2+2?\nA: "], sp).response_ids
    finally:
        _stop(proc)
