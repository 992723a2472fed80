"""A test-only callback: each rank dumps its final policy weights and the prompts it rolled out."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


class DumpWeights(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.prompts: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.last_batch is not None and pl_module.last_batch.prompts:
            self.prompts.extend(pl_module.last_batch.prompts)

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.policy.model.state_dict().items()}
        torch.save({"weights": state, "prompts": self.prompts}, self.out / f"rank{trainer.global_rank}.pt")
