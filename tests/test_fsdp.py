"""Two-process FSDP on CPU (gloo): sharded policy, gathered weight sync into each rank's engine, global clipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fit_utils import run_two_rank_fit


def _fit_fsdp(ckpt, out: Path, steps: int, *extra: str, pareto: bool = False) -> None:
    callbacks = [
        f"{{class_path: ddp_dump.DumpEngine, init_args: {{out: {out}/engine}}}}",
        # sharded saves into a hidden directory renamed into place, last.ckpt a link to the newest (the retention
        # of the shipped configs)
        f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, save_last: link, "
        "every_n_rl_steps: 1, keep_last: 2}}",
    ]
    if pareto:
        # no start evaluation: the step-2 checkpoint is then on the frontier alone and kept, whatever two RL steps
        # at lr 1e-2 did to its accuracy (a dominated one would be pruned)
        callbacks.insert(2, f"{{class_path: callbacks.ParetoFrontierCheckpoint, init_args: {{every_n_steps: 2, "
                            f"eval_size: 2, evaluate_at_start: false, dirpath: {out}/pareto}}}}")
    run_two_rank_fit(
        ckpt,
        out,
        # the sharded checkpoint format of configs/trainer/fsdp_8gpu.yaml
        "--trainer.strategy={class_path: ddp_dump.CPUFSDPStrategy, init_args: {state_dict_type: sharded}}",
        "--data.init_args.task_kwargs={num_train: 40, num_eval: 4}",
        "--data.init_args.threshold=0.9",
        "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",  # every group trains
        "--model.init_args.minibatches=2",  # two optimizer steps: the old-log-prob pass runs too
        # one denoising round per packed row and one row per forward: the ranks run different numbers of forwards,
        # which a sharded model must even out (every FSDP forward is a collective)
        "--model.init_args.micro_batch_size=2",
        "--model.init_args.max_copies=1",
        "--model.init_args.rows_per_forward=1",
        "--model.init_args.eval.max_new_tokens=8",
        "--model.init_args.eval.thresholds=[0.5]",
        f"--model.init_args.max_rl_steps={steps}",
        f"--trainer.callbacks=[{', '.join(callbacks)}]",
        *extra,
    )


@pytest.mark.timeout(600)
def test_fsdp_two_processes_weight_sync(peaky_checkpoint, tmp_path):
    out = tmp_path / "fsdp"
    _fit_fsdp(peaky_checkpoint, out, 2, pareto=True)
    a, b = (torch.load(out / "engine" / f"rank{r}.pt") for r in (0, 1))
    from lrl.models import load_checkpoint

    start, _ = load_checkpoint(peaky_checkpoint)
    initial = start.model.state_dict()
    full_numel = sum(p.numel() for p in start.model.parameters())
    # the policy really was sharded: each rank holds about half of the parameters
    assert a["sharded"] and b["sharded"]
    assert a["local_numel"] < full_numel and b["local_numel"] < full_numel
    assert a["local_numel"] + b["local_numel"] >= full_numel
    moved = 0
    for name, tensor in a["full"].items():
        torch.testing.assert_close(b["full"][name], tensor, rtol=0, atol=0, msg=f"gathered {name} differs by rank")
        # each rank's engine holds the gathered full weights, not its shard
        torch.testing.assert_close(a["engine"][name], tensor, rtol=0, atol=0, msg=f"rank 0 engine {name}")
        torch.testing.assert_close(b["engine"][name], tensor, rtol=0, atol=0, msg=f"rank 1 engine {name}")
        moved += not torch.equal(tensor, initial[name])
    assert moved > 0, "two RL steps at lr 1e-2 left every parameter unchanged"
    # the ranks needed different numbers of forwards somewhere, and the shorter one padded (else: a deadlock)
    assert a["padded_forwards"] + b["padded_forwards"] > 0
    # the Pareto checkpoint saved the gathered full weights (rank 0), loadable as an ordinary checkpoint
    saved, _ = load_checkpoint(out / "pareto" / "step-000002" / "model")
    for name, tensor in saved.model.state_dict().items():
        torch.testing.assert_close(tensor, a["full"][name], rtol=0, atol=0, msg=f"saved {name}")


@pytest.mark.timeout(600)
def test_fsdp_resume_matches_uninterrupted_run(tiny_checkpoint, tmp_path):
    """2 steps, stop, resume from the sharded last.ckpt (a link to the newest directory) for a 3rd == 3 steps
    straight (weights and engine)."""
    _fit_fsdp(tiny_checkpoint, tmp_path / "straight", 3)
    _fit_fsdp(tiny_checkpoint, tmp_path / "resumed", 2)
    _fit_fsdp(tiny_checkpoint, tmp_path / "resumed", 3, "--ckpt_path", "last")
    ckpts = tmp_path / "resumed" / "ckpts"
    # sharded directories, the newest 2 kept, last a link to step 3's; no hidden temporary directory left
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "rl_step=2.ckpt", "rl_step=3.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "rl_step=3.ckpt" / "meta.pt").is_file()
    for rank in (0, 1):
        a = torch.load(tmp_path / "straight" / "engine" / f"rank{rank}.pt")
        b = torch.load(tmp_path / "resumed" / "engine" / f"rank{rank}.pt")
        assert (a["rl_step"], a["steps_this_run"]) == (3, 3)
        assert (b["rl_step"], b["steps_this_run"]) == (3, 1), "the resumed run started over"
        for name, tensor in a["full"].items():
            torch.testing.assert_close(b["full"][name], tensor, rtol=0, atol=0, msg=f"rank {rank} policy {name}")
            torch.testing.assert_close(b["engine"][name], a["engine"][name], rtol=0, atol=0, msg=f"engine {name}")
