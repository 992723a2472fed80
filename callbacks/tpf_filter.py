"""`TPFAwareFilter`: LightningRL's group filters (spec §3.4) as a callback that plugs into the datamodule."""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lrl.rollout.types import RolloutBatch


class TPFAwareFilter(Callback):
    """Drop whole prompt groups that carry no learning signal; the datamodule refills the batch.

    Rules, applied in this order (a group is counted under the first rule that drops it):
    all responses wrong; TPF range max − min < ``tpf_range_threshold`` (TPF-aware filtering); total reward with
    zero standard deviation (DAPO dynamic sampling).

    Args:
        all_wrong: drop groups with no correct response.
        tpf_range_threshold: drop groups whose TPF range is below this (None disables; paper 0.01).
        zero_std: drop groups whose total reward is constant.

    Example::

        trainer = Trainer(callbacks=[TPFAwareFilter(all_wrong=True, tpf_range_threshold=0.01)])
    """

    def __init__(self, all_wrong: bool = True, tpf_range_threshold: float | None = 0.01, zero_std: bool = False):
        if tpf_range_threshold is not None and tpf_range_threshold < 0:
            raise MisconfigurationException(
                f"TPFAwareFilter.tpf_range_threshold must be >= 0, got {tpf_range_threshold}"
            )
        self.all_wrong = all_wrong
        self.tpf_range_threshold = tpf_range_threshold
        self.zero_std = zero_std
        self.totals = {
            "groups_seen": 0,
            "groups_kept": 0,
            "dropped_all_wrong": 0,
            "dropped_tpf_range": 0,
            "dropped_zero_std": 0,
        }

    def __call__(self, batch: RolloutBatch):
        from lrl.algorithms.filters import filter_groups

        res = filter_groups(
            batch.correct,
            batch.tpf,
            batch.rewards["total"],
            batch.group_index,
            all_wrong=self.all_wrong,
            tpf_range_threshold=self.tpf_range_threshold,
            zero_std=self.zero_std,
        )
        self.totals["groups_seen"] += int(res.num_groups)
        self.totals["groups_kept"] += len(res.kept)
        for k in ("dropped_all_wrong", "dropped_tpf_range", "dropped_zero_std"):
            self.totals[k] += int(getattr(res, k))
        return res

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "group_filter"):
            raise MisconfigurationException("TPFAwareFilter needs a RolloutDataModule (with a `group_filter` slot)")
        dm.group_filter = self

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seen = max(self.totals["groups_seen"], 1)
        pl_module.log_dict({f"filter/total_{k}": float(v) for k, v in self.totals.items()}, on_step=True, batch_size=1)
        pl_module.log("filter/total_kept_fraction", self.totals["groups_kept"] / seen, on_step=True, batch_size=1)

    @override
    def state_dict(self) -> dict:
        return {"totals": dict(self.totals)}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.totals.update(state_dict.get("totals", {}))
