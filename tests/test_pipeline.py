"""`lrl.pipeline`: weight sync as part of the generator contract (on by default, one RL-step counter, off-policy
configs refused), and refill rounds that every rank agrees on (two gloo processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fit_utils import free_port

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch

G = 2


class _Gen(RolloutGenerator):
    """Holds its own weights: records every sync and generates 2 responses per prompt (TPF 1 and 2)."""

    def __init__(self, own: torch.nn.Module | None = None):
        self.own, self.syncs, self.adopted = own, [], []

    def reads_weights_of(self, lm):
        return self.own is lm

    def update_weights(self, weights, version=None):
        self.syncs.append((sorted(weights), version))
        self.weight_version = version

    def adopt_version(self, version):
        self.adopted.append(version)
        super().adopt_version(version)

    def generate(self, prompts, sampling):
        n = len(prompts) * G
        return RolloutBatch(
            prompt_ids=[[1]] * n, response_ids=[[2, 3]] * n, texts=[f"{p}/{j}" for p in prompts for j in range(G)],
            step_maps=[[1, 1 + j] for _ in prompts for j in range(G)],
            num_forwards=torch.tensor([1, 2] * len(prompts)), num_store_passes=torch.zeros(n, dtype=torch.long),
            finish_reasons=["stop"] * n, group_index=torch.arange(len(prompts)).repeat_interleave(G),
            weight_version=self.weight_version,
        )


class _Task:
    def prompt(self, r):
        return f"p{r['i']}"

    def ground_truth(self, r):
        return ""

    def score(self, texts, records):  # response 0 of every group right
        return [1.0 if t.endswith("/0") else 0.0 for t in texts]


class _Module:
    """The parts of `LightningRLModule` the pipeline reads: the RL-step counter and the weights."""

    def __init__(self, trainer):
        self.policy = torch.nn.Linear(2, 2)
        self.tokenizer, self.rl_step, self.trainer = None, 0, trainer

    def gathered_policy_state(self):
        return dict(self.policy.state_dict())

    def planner_state(self):
        return {}


def _datamodule(gen, rank=0, world=1, n=8, **kw):
    from datamodules.rollout import RolloutDataModule

    dm = RolloutDataModule("unused", block_size=4, prompts_per_step=2, group_size=G, max_new_tokens=4, **kw)
    trainer = SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0)
    trainer.lightning_module = _Module(trainer)
    dm.task, dm.generator, dm.trainer = _Task(), gen, trainer
    dm.train_records = [{"i": i} for i in range(n)]
    return dm


def test_every_step_syncs_the_weights_of_the_modules_rl_step():
    gen = _Gen()
    dm = _datamodule(gen)
    module = dm.trainer.lightning_module
    for step in range(3):
        module.rl_step = step  # the one counter: the module's (training_step advances it)
        out = dm.next_batch()
        assert out.weight_version == step and out.stats["weight_version"] == step
    assert gen.syncs == [(["bias", "weight"], 0), (["bias", "weight"], 1), (["bias", "weight"], 2)]
    assert "rl_step" not in dm.state_dict()  # no second counter in the data module's checkpoint state
    # a second batch at the same step (nothing trained in between) syncs nothing
    dm.next_batch()
    assert len(gen.syncs) == 3


def test_sync_period_and_an_engine_on_the_policy_itself():
    gen = _Gen()
    dm = _datamodule(gen, sync_every_n_steps=2, allow_stale_rollouts=True)
    for step in range(4):
        dm.trainer.lightning_module.rl_step = step
        dm.next_batch()
    assert [v for _, v in gen.syncs] == [0, 2]
    # an engine that decodes with the policy's own tensors copies nothing: it only takes the version
    dm = _datamodule(None)
    dm.generator = gen = _Gen(own=dm.trainer.lightning_module.policy)
    dm.trainer.lightning_module.rl_step = 5
    dm.next_batch()
    assert gen.syncs == [] and gen.adopted == [5] and gen.weight_version == 5


def test_off_policy_configs_are_refused_naming_the_key():
    from datamodules.rollout import RolloutBackend, RolloutDataModule

    sglang = RolloutBackend(kind="sglang", urls=["http://127.0.0.1:1"])
    with pytest.raises(ValueError, match=r"data.init_args.sync_every_n_steps=0 leaves the SGLang servers on older "
                                         r"weights .* data.init_args.allow_stale_rollouts=true"):
        RolloutDataModule("unused", block_size=4, rollout=sglang, sync_every_n_steps=0)
    RolloutDataModule("unused", block_size=4, rollout=sglang, sync_every_n_steps=0, allow_stale_rollouts=True)
    # a generator with its own copy, found when it is built (before its first rollout)
    dm = _datamodule(None, sync_every_n_steps=3)
    dm._build_generator = _Gen
    with pytest.raises(ValueError, match=r"sync_every_n_steps=3 leaves the rollout generator's own weights \(_Gen\)"):
        dm.get_generator()
    dm = _datamodule(None, sync_every_n_steps=3)
    dm._build_generator = lambda: _Gen(own=dm.trainer.lightning_module.policy)
    assert dm.get_generator() is not None  # it decodes with the policy itself: never stale


def test_shared_generator_is_synced_by_rank_zero_only():
    barriers = []
    for rank in (0, 1):
        gen = _Gen()
        dm = _datamodule(gen, rank=rank, world=2)
        gen.shared_across_ranks = True
        dm.trainer.strategy = SimpleNamespace(barrier=barriers.append)
        dm.trainer.lightning_module.rl_step = 4
        dm.pipeline.sync(gen, 4, dm.trainer.lightning_module)
        assert ([v for _, v in gen.syncs], gen.adopted) == (([4], []) if rank == 0 else ([], [4]))
    assert barriers == ["lrl_weight_sync", "lrl_weight_sync"]


# ---------------------------------------------------------------- refill rounds under data parallelism
def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from lrl.pipeline import GroupFilter

        # rank 1's groups are all wrong (dropped); rank 0's keep one right response each
        gen = _Gen()
        dm = _datamodule(gen, rank=rank, world=world, n=40, max_refill_rounds=3, seed=1,
                         filter=GroupFilter(all_wrong=True))
        if rank == 1:
            dm.task.score = lambda texts, records: [0.0] * len(texts)
        calls = []
        orig = gen.generate
        gen.generate = lambda prompts, sp: calls.append(len(prompts)) or orig(prompts, sp)
        out_batch = dm.next_batch()
        torch.save({"stats": out_batch.stats, "calls": calls, "n": len(out_batch)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ranks_run_the_same_refill_rounds_when_one_ranks_groups_are_dropped(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # rank 0 filled its 2 groups in round 1; rank 1 drew 2 prompts in each of the 3 rounds and kept none
    assert r0["calls"] == [2] and r1["calls"] == [2, 2, 2]
    assert (r0["stats"]["filter/rounds"], r1["stats"]["filter/rounds"]) == (1, 3)
    # but both took part in the same 3 rounds (an all-reduce each): neither waits past the other's rounds
    assert r0["stats"]["filter/step_rounds"] == r1["stats"]["filter/step_rounds"] == 3
    assert (r0["n"], r1["n"]) == (2 * G, 0) and r1["stats"]["filter/dropped_all_wrong"] == 6
