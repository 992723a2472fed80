"""Phase switching between rollout and training (issue 27): after a step's rollouts the data module releases what
the generator holds (unless configured not to), and logs the engine's KV and batching figures of the step."""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch

G = 2


class _CountingGen(RolloutGenerator):
    """Fixed responses; counts release calls and reports per-call engine figures (two refill rounds differ)."""

    weight_version = 0

    def __init__(self):
        self.calls, self.releases, self.released_when = 0, 0, []

    def update_weights(self, weights, version=None):
        pass

    def generate(self, prompts, sampling):
        self.calls += 1
        n = len(prompts) * G
        return RolloutBatch(
            prompt_ids=[[1]] * n, response_ids=[[2]] * n, texts=[p for p in prompts for _ in range(G)],
            step_maps=[[1]] * n, num_forwards=torch.ones(n, dtype=torch.long),
            num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
            group_index=torch.arange(len(prompts)).repeat_interleave(G))

    def last_stats(self):
        c = self.calls
        return {"rollout/kv_peak_gb": 1.0 * c, "rollout/rows_per_forward": 4.0 * c, "rollout/preempted_rows": 3.0}

    def release_memory(self):
        self.releases += 1
        self.released_when.append(self.calls)


@pytest.mark.parametrize("release", [True, False])
def test_rollout_memory_released_before_training_and_engine_figures_logged(release):
    from datamodules.rollout import RolloutBackend, RolloutDataModule

    dm = RolloutDataModule("unused", block_size=4, prompts_per_step=2, group_size=G, max_new_tokens=4,
                           max_refill_rounds=2, rollout=RolloutBackend(release_after_rollout=release))
    gen = _CountingGen()
    dm.task = type("T", (), {"prompt": lambda self, r: f"p{r['i']}", "ground_truth": lambda self, r: ""})()
    dm.generator, dm.trainer = gen, type("Tr", (), {"global_rank": 0, "world_size": 1})()
    dm.train_records = [{"i": i} for i in range(10)]
    dm.pipeline.score = lambda b, r, task: setattr(b, "rewards", {k: torch.zeros(len(b)) for k in dm.reward_names()})
    dm.pipeline.group_filter = lambda b: type("R", (), {
        "kept": torch.zeros(0, dtype=torch.long), "dropped_all_wrong": 0, "dropped_tpf_range": b.num_groups,
        "dropped_zero_std": 0})()
    out = dm.next_batch()  # every group filtered: two refill rounds, so two generate calls
    assert gen.calls == 2
    assert gen.released_when == ([2] if release else [])  # once, after the last round, before training
    assert out.stats["rollout/kv_peak_gb"] == 2.0  # the step's peak: the max over rounds
    assert out.stats["rollout/rows_per_forward"] == 6.0  # the mean of 4 and 8
    assert out.stats["rollout/preempted_rows"] == 6.0  # a count: the sum
