"""Batch statistics under data parallelism (spec §3.5, paper Eq. 7): two gloo processes on CPU, each running the
real `RolloutDataModule.next_batch` on its own prompt groups, normalise advantages by the mean and std of *both*
ranks' responses, equal to one process normalising the concatenation; reward logs are global too."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fit_utils import free_port

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch

G = 2  # responses per prompt


class _FakeGenerator(RolloutGenerator):
    """Responses whose reward is fixed by the prompt text (``p<i>``) and the sample index: see `_reward`."""

    weight_version = 0

    def update_weights(self, weights, version=None):
        pass

    def generate(self, prompts, sampling):
        n = len(prompts) * G
        return RolloutBatch(
            prompt_ids=[[1]] * n, response_ids=[[2, 3]] * n, texts=[f"{p}/{j}" for p in prompts for j in range(G)],
            step_maps=[[1, 2]] * n, num_forwards=torch.full((n,), 2), num_store_passes=torch.zeros(n, dtype=torch.long),
            finish_reasons=["stop"] * n, group_index=torch.arange(len(prompts)).repeat_interleave(G),
        )


def _reward(text: str) -> float:
    # prompt i, sample j → 3·i + j²: rank-local means and stds differ from the global ones for any split
    p, j = text.split("/")
    return 3.0 * int(p[1:]) + int(j) ** 2


class _Task:
    def prompt(self, record):
        return f"p{record['i']}"

    def ground_truth(self, record):
        return ""


class _Trainer:
    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size = rank, world


def _datamodule(rank: int, world: int):
    from datamodules.rollout import RolloutDataModule

    dm = RolloutDataModule("unused", block_size=4, prompts_per_step=2, group_size=G, max_new_tokens=4,
                           advantage="batch", max_refill_rounds=1, seed=3)
    dm.task, dm.generator, dm.trainer = _Task(), _FakeGenerator(), _Trainer(rank, world)
    dm.train_records = [{"i": i} for i in range(8)]

    def score(batch, records, task):
        total = torch.tensor([_reward(t) for t in batch.texts])
        names = ("acc_raw", "tpf_raw", "acc", "tpf", "total")
        batch.rewards = {k: total * (0.5 if k != "total" else 1.0) for k in names}

    dm.pipeline.score = score
    return dm


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = _datamodule(rank, world)
        first = dm.next_batch()
        # step 2: rank 1 filters every group out; it still joins the collective (no hang) and rank 0 normalises
        # over the responses that are left, rank 0's own
        if rank == 1:
            dm.pipeline.group_filter = lambda b: type("R", (), {"kept": torch.zeros(0, dtype=torch.long),
                                                      "dropped_all_wrong": b.num_groups, "dropped_tpf_range": 0,
                                                      "dropped_zero_std": 0})()
        second = dm.next_batch()
        torch.save({"texts": first.texts, "adv": first.advantages, "stats": first.stats,
                    "texts2": second.texts, "adv2": second.advantages, "stats2": second.stats}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_batch_advantages_and_reward_logs_are_global_over_ranks(tmp_path):
    from lrl.algorithms.advantages import compute_advantages

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(r0["texts"]) == len(r1["texts"]) == 2 * G and not {t.split("/")[0] for t in r0["texts"]} & {
        t.split("/")[0] for t in r1["texts"]}  # each rank rolled out its own 2 prompts

    # one process over the same 8 responses
    texts = r0["texts"] + r1["texts"]
    rewards = torch.tensor([_reward(t) for t in texts], dtype=torch.float64)
    expected = compute_advantages(rewards, torch.arange(4).repeat_interleave(G), "batch")
    torch.testing.assert_close(torch.cat([r0["adv"], r1["adv"]]), expected, rtol=0, atol=1e-6)
    local = compute_advantages(rewards[: 2 * G], torch.arange(2).repeat_interleave(G), "batch")
    assert (local - r0["adv"]).abs().max() > 0.05  # the rank-local statistic (the old behaviour) is different
    for st in (r0["stats"], r1["stats"]):
        assert st["reward/total/mean"] == pytest.approx(float(rewards.mean()), abs=1e-9)
        assert st["reward/total/std"] == pytest.approx(float(rewards.std(unbiased=False)), abs=1e-9)
        assert st["reward/acc/mean"] == pytest.approx(0.5 * float(rewards.mean()), abs=1e-9)
        assert st["data/global_responses"] == 8

    # step 2: rank 1 kept nothing, rank 0's advantages are normalised over its own 4 responses
    assert r1["texts2"] == [] and r1["stats2"]["filter/kept"] == 0
    rew2 = torch.tensor([_reward(t) for t in r0["texts2"]])
    torch.testing.assert_close(r0["adv2"], compute_advantages(rew2, torch.arange(2).repeat_interleave(G)),
                               rtol=0, atol=1e-6)
    assert r0["stats2"]["data/global_responses"] == 4


def test_single_process_stats_match_torch():
    from lrl.algorithms.advantages import global_mean_std

    # [1, 2, 3, 6]: mean 3, Σd² = 14 → unbiased √(14/3) = 2.160247, population √3.5 = 1.870829
    (n, mean, unb, pop), (n0, m0, u0, p0), (n1, m1, u1, _) = global_mean_std(
        [torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.zeros(0), torch.tensor([5.0])])
    assert (n, mean) == (4, 3.0) and unb == pytest.approx(2.160247, abs=1e-6) and pop == pytest.approx(1.870829,
                                                                                                      abs=1e-6)
    assert (n0, m0, u0, p0) == (0, 0.0, 0.0, 0.0) and (n1, m1, u1) == (1, 5.0, 0.0)
