"""Refill never repeats a prompt within a step, and the default epoch ends when refills used up its prompts."""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch

G = 2


class _Gen(RolloutGenerator):
    weight_version = 0

    def update_weights(self, weights, version=None):
        pass

    def generate(self, prompts, sampling):
        n = len(prompts) * G
        return RolloutBatch(
            prompt_ids=[[1]] * n, response_ids=[[2]] * n, texts=[p for p in prompts for _ in range(G)],
            step_maps=[[1]] * n, num_forwards=torch.ones(n, dtype=torch.long),
            num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
            group_index=torch.arange(len(prompts)).repeat_interleave(G),
        )


class _Task:
    def prompt(self, r):
        return f"p{r['i']}"

    def ground_truth(self, r):
        return ""


class _Trainer:
    def __init__(self, rank=0, world=1):
        self.global_rank, self.world_size = rank, world


def _dm(n_records, pps, keep_none=True, world=1, rank=0, **kw):
    from datamodules.rollout import RolloutDataModule

    dm = RolloutDataModule("unused", block_size=4, prompts_per_step=pps, group_size=G, max_new_tokens=4, **kw)
    dm.task, dm.generator, dm.trainer = _Task(), _Gen(), _Trainer(rank, world)
    dm.train_records = [{"i": i} for i in range(n_records)]

    def score(batch, records, task):
        batch.rewards = {k: torch.zeros(len(batch)) for k in dm.reward_names()}

    dm.pipeline.score = score
    if keep_none:  # every group filtered out: each step refills as far as it may
        dm.pipeline.group_filter = lambda b: type("R", (), {
            "kept": torch.zeros(0, dtype=torch.long), "dropped_all_wrong": 0, "dropped_tpf_range": b.num_groups,
            "dropped_zero_std": 0})()
    return dm


def _drawn(dm):
    seen = []
    gen = dm.generator
    orig = gen.generate

    def record(prompts, sampling):
        seen.extend(prompts)
        return orig(prompts, sampling)

    gen.generate = record
    return seen


def test_refill_stops_before_repeating_a_prompt():
    # 5 prompts, 2 per step, 4 rounds allowed: rounds draw 2, 2, 1 (the last unseen one), then stop (old code: 8
    # draws, 3 of them repeats)
    dm = _dm(5, 2, max_refill_rounds=4)
    seen = _drawn(dm)
    out = dm.next_batch()
    assert len(seen) == 5 and len(set(seen)) == 5
    assert out.stats["filter/drawn"] == 5 and out.stats["filter/rounds"] == 3 and out.stats["filter/refill_capped"] == 1


def test_refill_with_two_ranks_shares_no_prompt():
    # 7 prompts over 2 ranks: at most 3 draws per rank per step; the two ranks' draws never meet
    drawn = []
    for rank in (0, 1):
        dm = _dm(7, 2, world=2, rank=rank, max_refill_rounds=4)
        seen = _drawn(dm)
        dm.next_batch()
        assert len(seen) == 3 == len(set(seen))
        drawn.append(set(seen))
    assert not drawn[0] & drawn[1]


def test_default_epoch_ends_when_refills_used_up_its_prompts():
    # 8 prompts, 2 per step: 4 refill-free steps; with everything filtered step 1 draws 2+2+2 = 6 (3 rounds),
    # step 2 the last 2 unseen ones (its refill capped); a 3rd step would repeat: the epoch ends after 2 steps, each
    # prompt drawn once, and the next epoch starts a fresh permutation
    dm = _dm(8, 2, max_refill_rounds=3)
    seen = _drawn(dm)
    assert dm.steps_per_epoch == 4
    items = list(iter(dm.train_dataloader().dataset))
    assert len(items) == 2 and len(seen) == 8 == len(set(seen)) and items[1].stats["filter/refill_capped"] == 1
    assert dm.epoch == 1 and dm.cursor == 0
    # without filtering every step draws 2: all 4 steps run, 8 distinct prompts
    dm = _dm(8, 2, keep_none=False)
    seen = _drawn(dm)
    assert len(list(iter(dm.train_dataloader().dataset))) == 4 and len(set(seen)) == 8
    # a given steps_per_epoch is kept (the order wraps within the epoch)
    dm = _dm(8, 2, max_refill_rounds=3, steps_per_epoch=3)
    assert len(list(iter(dm.train_dataloader().dataset))) == 3


def test_a_split_too_small_for_one_step_is_refused():
    dm = _dm(3, 2, world=2)
    with pytest.raises(ValueError, match=r"data.prompts_per_step=2 × 2 rank\(s\) needs at least 4 training prompts"):
        dm.check_prompt_supply()
