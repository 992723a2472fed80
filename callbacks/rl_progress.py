"""`RLProgressBar`: a progress bar counted in RL steps (``model.max_rl_steps``), not in Lightning epochs/batches."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override


class RLProgressBar(TQDMProgressBar):
    """One bar for the whole run: ``RL step k/max_rl_steps`` with the step's key metrics.

    Lightning's default bar counts batches of the current epoch against the datamodule's epoch length ("Epoch 0/999
    … 60/125"), which says nothing about an RL run whose length is ``model.max_rl_steps``. Without
    ``max_rl_steps`` the total is unknown and the bar just counts.

    Args:
        refresh_rate: update every this many RL steps.
        metrics: logged keys shown after the bar (missing keys are skipped).
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        metrics: tuple[str, ...] = ("reward/accuracy/mean", "tpf/mean", "rollout/forwards_per_response", "loss/total"),
    ):
        super().__init__(refresh_rate=refresh_rate)
        self.metrics = tuple(metrics)

    def _total(self, pl_module) -> int | None:
        total = getattr(getattr(pl_module, "hparams", None), "max_rl_steps", None)
        return int(total) if total else None

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=self._total(pl_module))
        self.train_progress_bar.initial = int(getattr(pl_module, "rl_step", 0))  # resumed runs continue the count
        self.train_progress_bar.n = self.train_progress_bar.initial
        self.train_progress_bar.set_description("RL step")

    @override
    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # one bar across epochs

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = int(getattr(pl_module, "rl_step", bar.n + 1))
        if bar.n % self.refresh_rate == 0 or bar.n == bar.total:
            logged = trainer.callback_metrics
            bar.set_postfix({k.split("/")[-2] if k.endswith("/mean") else k.split("/")[-1]: f"{float(logged[k]):.3g}"
                             for k in self.metrics if k in logged})
            bar.refresh()

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    @override
    def on_train_end(self, *_: Any) -> None:
        if self.train_progress_bar is not None:
            self.train_progress_bar.close()
