"""Two-process DDP (gloo, CPU): each rank rolls out its own prompt groups; the ranks' weights stay identical."""

from __future__ import annotations

import pytest
import torch
from fit_utils import run_two_rank_fit


@pytest.mark.timeout(600)
def test_ddp_two_processes_gloo(tiny_checkpoint, tmp_path):
    out = tmp_path / "ddp"
    run_two_rank_fit(
        tiny_checkpoint,
        out,
        "--trainer.strategy=ddp",
        "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}",
        "--data.init_args.threshold=0.0",
        "--model.init_args.minibatches=2",
        "--model.init_args.micro_batch_size=1",
        "--model.init_args.max_rl_steps=1",
        "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",
        "--trainer.callbacks=["
        f"{{class_path: ddp_dump.DumpWeights, init_args: {{out: {out}/weights}}}}, "
        f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, "
        "save_last: true, every_n_rl_steps: 1}}]",
    )
    ckpt = torch.load(out / "ckpts" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] > 0
    dumps = sorted((out / "weights").glob("rank*.pt"))
    assert len(dumps) == 2, f"expected one weight dump per rank, got {dumps}"
    a, b = (torch.load(p) for p in dumps)
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=0, atol=0, msg=f"ranks diverged at {k}")
    # each rank generated its own share of prompt groups: 2 per step, never the same prompt
    assert len(a["prompts"]) == len(b["prompts"]) == 2  # 1 RL step of 2 prompt groups per rank
    assert not set(a["prompts"]) & set(b["prompts"])
