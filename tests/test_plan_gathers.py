"""The plan's evaluation and weight-sync rows (issue 28 items 5 and 7) against CPU measurements on the tiny model:
the evaluation engine's KV pool is the configured budget (``model.init_args.eval`` / the rollout's), measured as
live tensor bytes, and the evaluation phase is within ±15 % of the measured peak; under FSDP (2 gloo processes)
the weight sync's gathered state dict holds exactly the plan's full-weights bytes on every rank."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fit_utils import free_port
from test_plan import _shape  # the plan's shape of a measured model

from datamodules.rollout import RolloutBackend
from lrl.plan import build_plan
from lrl.plan.measure import LiveTensorBytes

DATA, MODEL = "datamodules.RolloutDataModule", "lrl.module.LightningRLModule"
EVAL_CB = {"class_path": "callbacks.ParetoFrontierCheckpoint", "init_args": {"eval_size": 8}}


def _plan(shape, rollout: dict, trainer: dict | None = None, world: int = 1):
    t = {"precision": "32-true", "devices": world, "callbacks": [EVAL_CB],
         **(trainer or {})}
    return build_plan({"checkpoint": "x", "block_size": 4, "model": {"class_path": "lrl.module.LightningRLModule",
                       "init_args": {"loss": {"kl_beta": 0.0}, "eval": {"max_new_tokens": 16, "thresholds": [0.5]}}},
                       "data": {"class_path": DATA, "init_args": {"rollout": rollout}}, "trainer": t},
                      shape=shape, world_size=world, device_gb=1)


def _measured_eval_peak(checkpoint, kv_cache_gb: float, transient_gb: float) -> int:
    """`LightningRLModule.run_pareto` (8 records, static + φ = 0.5, 16 new tokens) with the rollout's budget."""
    from lrl.module import LightningRLModule
    from lrl.tasks import get_task

    module = LightningRLModule(str(checkpoint), block_size=4, loss={"kl_beta": 0.0},
                               eval={"max_new_tokens": 16, "thresholds": [0.5]})
    module.configure_model()
    dm = SimpleNamespace(rollout_cfg=RolloutBackend(kv_cache_gb=kv_cache_gb, transient_gb=transient_gb))
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, datamodule=dm, precision="32-true")
    task = get_task("synthetic", num_train=10, num_eval=8)
    with LiveTensorBytes() as mode:
        module.run_pareto(task, task.load("test"))
    return mode.peak


def test_evaluation_kv_is_the_rollout_budget_and_the_phase_matches_the_measured_peak(tiny_checkpoint, tiny_lm):
    shape = _shape(tiny_lm)
    big, small = _measured_eval_peak(tiny_checkpoint, 0.05, 0.005), _measured_eval_peak(tiny_checkpoint, 0.03, 0.005)
    page = tiny_lm.kv_bytes_per_token() * 4  # one 4-token page
    # the engine's pool follows the budget: 20 MB more budget, 20 MB more measured (the engine used to ignore it)
    assert abs((big - small) - 20_000_000) <= 2 * page, (big, small)
    plan = _plan(shape, {"kv_cache_gb": 0.05, "transient_gb": 0.005})
    rows = {r.component: r.bytes for r in plan.rows}
    assert rows["evaluation KV cache"] == 50_000_000 and rows["evaluation transients"] == 5_000_000
    assert 0.85 <= big / plan.phase_bytes("evaluation") <= 1.15, (big, plan.phase_bytes("evaluation"))
    # the evaluation's own budget overrides the rollout's
    own = build_plan({"checkpoint": "x", "block_size": 4,
                      "model": {"class_path": MODEL, "init_args": {"eval": {"kv_cache_gb": 0.01}}},
                      "data": {"class_path": DATA, "init_args": {"rollout": {"kv_cache_gb": 0.05}}},
                      "trainer": {"precision": "32-true", "callbacks": [EVAL_CB]}}, shape=shape, device_gb=1)
    assert {r.component: r.bytes for r in own.rows}["evaluation KV cache"] == 10_000_000


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from lrl.models import build_tiny_model
        from lrl.models.sharding import full_state_dict, submodule_prefix, wrap_fsdp
        from lrl.models.tiny import build_char_tokenizer

        lm = build_tiny_model(build_char_tokenizer(), block_size=4, seed=0)
        layers = {type(m) for m in lm.model.modules() if m.__class__.__name__.endswith("DecoderLayer")}
        wrapped = wrap_fsdp(lm, layers, device=torch.device("cpu"))
        local = sum(p.numel() for p in wrapped.parameters())
        state = full_state_dict(wrapped, prefix=submodule_prefix(wrapped, wrapped.module.model))  # what the sync calls
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in state.values()}
        torch.save({"bytes": sum(storages.values()), "local": local,
                    "shapes": {k: tuple(v.shape) for k, v in state.items()}}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_fsdp_weight_sync_gathers_the_plans_full_weights_on_every_rank(tiny_lm, tmp_path):
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    shape = _shape(tiny_lm)
    plan = _plan(shape, {"kv_cache_gb": 0.05}, {"strategy": "fsdp", "precision": "bf16-mixed"}, world=2)
    row = next(r for r in plan.rows if r.component == "weight sync: gathered policy")
    unit = max(shape.root_params, shape.layer_params) * 4
    full = {k: tuple(v.shape) for k, v in tiny_lm.model.state_dict().items()}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["local"] < shape.params  # the policy really was sharded
        assert got["shapes"] == full  # full tensors, not shards
        # what stays alive after the gather is the plan's full float32 weights exactly (the row adds the one unit
        # unsharded during the gather, which FSDP frees by resizing storage: not visible to LiveTensorBytes)
        assert got["bytes"] == row.bytes - unit == shape.params * 4
