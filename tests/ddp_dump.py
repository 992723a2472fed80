"""A test-only callback: each rank dumps its final policy weights and the prompts it rolled out."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy


class DumpWeights(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.prompts: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_batch is not None and pl_module.last_batch.prompts:
            self.prompts.extend(pl_module.last_batch.prompts)

    def on_train_end(self, trainer, pl_module):
        trainer.datamodule.sync_generator()  # a server the run used then serves the trained weights
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.policy.model.state_dict().items()}
        torch.save({"weights": state, "prompts": self.prompts}, self.out / f"rank{trainer.global_rank}.pt")


class CPUFSDPStrategy(FSDPStrategy):
    """Test-only: Lightning's FSDP on CPU processes (gloo). Lightning refuses the exact `FSDPStrategy` class without
    a GPU; torch's FSDP itself runs on CPU (the module passes ``device_id=cpu`` when it shards the policy), which is
    enough to check sharded training, weight sync and clipping."""

    strategy_name = "cpu_fsdp_test"


class DumpEngine(Callback):
    """Each rank saves its rollout engine's weights, the gathered full policy and the size of its local shard."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.steps_this_run = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps_this_run += 1

    def on_train_end(self, trainer, pl_module):
        from lrl.models.sharding import full_state_dict, is_sharded, submodule_prefix

        trainer.datamodule.sync_generator()  # each step syncs before its rollouts: bring in the last update too
        root = trainer.strategy.model
        full = full_state_dict(root, prefix=submodule_prefix(root, pl_module.policy.model))
        engine = trainer.datamodule.get_generator().lm.model.state_dict()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "sharded": is_sharded(root),
            "rl_step": pl_module.rl_step,
            "padded_forwards": pl_module.padded_forwards,
            "steps_this_run": self.steps_this_run,
            "device": next(pl_module.policy.parameters()).device.type,  # Lightning moves it back to CPU after fit
            "local_numel": sum(p.numel() for p in pl_module.policy.parameters()),
            "full": {k: v.detach().cpu().clone() for k, v in full.items()},
            "engine": {k: v.detach().cpu().clone() for k, v in engine.items()},
        }, self.out / f"rank{trainer.global_rank}.pt")
