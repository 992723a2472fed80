"""`WeightSync`: push the policy's weights to the rollout generator after every RL step, timed and versioned."""

from __future__ import annotations

import time

from lightning.pytorch import Callback
from typing_extensions import override


class WeightSync(Callback):
    """After each training step, copy the policy into the rollout generator and bump ``weight_version``.

    The native engine gets an in-process copy of the tensors; the SGLang generator saves or broadcasts them
    (its ``sync_from_model``). The version is saved in checkpoints, so a resumed run continues the count.

    Under FSDP the policy's parameters are shards: every rank first gathers the full tensors (a collective), then
    each rank's native engine takes them. Rollout servers are shared by all ranks, so only global rank 0 pushes
    to them; the other ranks wait at a barrier and adopt the new version.

    Args:
        every_n_steps: sync period in RL steps (1 = strictly on-policy rollouts).
    """

    def __init__(self, every_n_steps: int = 1):
        if every_n_steps < 1:
            from lightning.pytorch.utilities.exceptions import MisconfigurationException

            raise MisconfigurationException(f"WeightSync.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.version = 0
        self.last_sync_s = 0.0

    def _sync(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        gen = dm.get_generator()
        start = time.perf_counter()
        weights = pl_module.gathered_policy_state()  # FSDP: a collective, all ranks gather before anyone pushes
        if hasattr(gen, "sync_from_model"):  # a server shared by every rank
            if trainer.is_global_zero:
                gen.sync_from_model(pl_module.policy, pl_module.tokenizer, self.version, state_dict=weights)
            if trainer.world_size > 1:
                trainer.strategy.barrier("lrl_weight_sync")
                if not trainer.is_global_zero:
                    gen.adopt_version(self.version)
        else:  # in-process engine: the planner head (dUltra) travels too
            planner = pl_module.planner_state() if hasattr(pl_module, "planner_state") else {}
            gen.update_weights({**weights, **planner}, version=self.version)
        self.last_sync_s = time.perf_counter() - start

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        # restored or initial weights: make the generator match them before the first rollout
        self._sync(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (pl_module.rl_step % self.every_n_steps) != 0:
            return
        self.version += 1
        self._sync(trainer, pl_module)
        pl_module.log_dict(
            {"timing/sync_s": self.last_sync_s, "weight_version": float(self.version)}, on_step=True, batch_size=1
        )

    @override
    def state_dict(self) -> dict:
        return {"version": self.version}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.version = int(state_dict.get("version", 0))
