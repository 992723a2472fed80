"""The Pareto evaluation split across ranks (issue 28 item 5): two gloo processes on CPU each decode half of the
held-out records through `LightningRLModule.run_pareto` and gather the per-record results; both return exactly
the sweep one process computes over all records (accuracy, tokens, forwards, store passes, styles, AUP)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fit_utils import free_port

EVAL = {"thresholds": [0.9, 0.5], "max_new_tokens": 8}
TASK = {"num_train": 10, "num_eval": 5, "family": "sums", "styles": {"chain": 0.5, "pairs": 0.5}}


class _Trainer:
    """What `run_pareto` reads of a trainer: the ranks (no data module: the engine's own defaults)."""

    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size, self.datamodule, self.precision = rank, world, None, "32-true"


def _sweep(ckpt: str, rank: int, world: int) -> dict:
    from lrl.module import LightningRLModule
    from lrl.tasks import get_task

    module = LightningRLModule(ckpt, block_size=4, loss={"kl_beta": 0.0}, eval=EVAL)
    module.configure_model()
    module._trainer = _Trainer(rank, world)
    task = get_task("synthetic", **TASK)
    result = module.run_pareto(task, task.load("test")).to_dict()
    for p in result["points"]:
        p.pop("wall_s")
    return result


def _worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_sweep(ckpt, rank, world), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_gather_exactly_the_one_process_sweep(peaky_checkpoint, tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(peaky_checkpoint), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = _sweep(str(peaky_checkpoint), 0, 1)
    assert r0 == single and r1 == single
    assert [p["num_responses"] for p in single["points"]] == [5, 5, 5]  # 3 + 2 records, gathered
    # not a degenerate sweep: the thresholds decode with different forward counts
    assert len({p["forwards"] for p in single["points"]}) == 3


def test_one_rank_of_two_decodes_only_its_share(peaky_checkpoint, monkeypatch):
    """Rank 1 of 2 decodes records 1 and 3 of 5 (what the gather then completes)."""
    from lrl.rollout.engine import NativeEngine

    seen = []
    real = NativeEngine.generate

    def spy(self, prompts, sampling):
        seen.append(len(prompts))
        return real(self, prompts, sampling)

    monkeypatch.setattr(NativeEngine, "generate", spy)
    gathered = []

    def fake_gather(obj):
        gathered.append(obj)
        return [obj]

    monkeypatch.setattr("lrl.evaluation.pareto.all_gather_object", fake_gather)
    from lrl.module import LightningRLModule
    from lrl.tasks import get_task

    module = LightningRLModule(str(peaky_checkpoint), block_size=4, loss={"kl_beta": 0.0}, eval=EVAL)
    module.configure_model()
    module._trainer = _Trainer(1, 2)
    task = get_task("synthetic", **TASK)
    module.run_pareto(task, task.load("test"))
    assert seen == [2, 2, 2] and [r.index for r in gathered[0][0]] == [1, 3]
