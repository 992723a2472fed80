"""Test-only callbacks for `lrl fit` subprocesses that are signalled or killed at a known point."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback


class SlowStepStart(Callback):
    """Before the RL step that starts at ``rl_step == at_step``, create ``marker_dir/step_start_<at_step>`` and
    sleep ``seconds``: a signal sent once the marker appears lands inside that step (the sleep only widens the
    window; nothing is timed)."""

    def __init__(self, marker_dir: str, at_step: int, seconds: float = 2.0):
        self.marker_dir = Path(marker_dir)
        self.at_step = at_step
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.rl_step == self.at_step:
            (self.marker_dir / f"step_start_{self.at_step}").touch()
            time.sleep(self.seconds)


class PauseInCheckpointWrite(Callback):
    """From the ``nth`` checkpoint file written on, write half of its bytes, create ``marker`` and hang: the
    test then kills the process with SIGKILL in the middle of a checkpoint write."""

    def __init__(self, marker: str, nth: int):
        self.marker = marker
        self.nth = nth

    def setup(self, trainer, pl_module, stage: str) -> None:
        import io

        import torch

        import lrl.atomic as ckpt_mod

        real_save = torch.save
        count = {"n": 0}

        def save(obj, f, *args, **kwargs):
            count["n"] += 1
            if count["n"] < self.nth:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            tmp = Path(self.marker + ".tmp")
            tmp.write_text(str(f.name))
            tmp.rename(self.marker)  # the test polls for the marker: it must appear complete
            time.sleep(600)

        ckpt_mod.torch = _TorchWithSave(torch, save)


class _TorchWithSave:
    """``torch`` with ``save`` replaced (only inside `lrl.atomic`, where checkpoints are written)."""

    def __init__(self, torch_module, save):
        self._torch = torch_module
        self.save = save

    def __getattr__(self, name):
        return getattr(self._torch, name)


class SignalSelf(Callback):
    """Send ``signum`` to this very process at the start of the RL step that starts at ``rl_step == at_step`` (an
    in-process stand-in for a scheduler's signal)."""

    def __init__(self, signum: int, at_step: int):
        self.signum = signum
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import os

        if pl_module.rl_step == self.at_step:
            os.kill(os.getpid(), self.signum)
