"""`RLCheckpoint`: crash-safe training checkpoints counted in RL steps, a final one, and one on preemption.

Lightning's `ModelCheckpoint` counts optimizer steps (``trainer.global_step``): an RL step whose groups were all
filtered out (or whose loss was NaN-skipped) takes no optimizer step and never triggers a save, and nothing saves
the state when training ends. Its writer serialises to a temp file in ``$TMPDIR`` and, when that is another
filesystem, copies it over the target: a kill during the copy leaves a truncated ``last.ckpt`` and no older one.
`RLCheckpoint` keeps `ModelCheckpoint`'s naming, top-k and ``last.ckpt`` logic and changes when and how it writes:

* every ``every_n_rl_steps`` RL steps (``LightningRLModule.rl_step``; filtered and skipped steps count), once at
  the end of training, and when the run is preempted (SIGTERM or SIGUSR1; the current step finishes first);
* the step's metrics are written and flushed to the loggers before its checkpoint, so a kill between the two
  cannot lose them;
* every file is written to a temporary file in the target's own directory, fsynced and renamed into place
  (`AtomicCheckpointIO`): the previous ``last.ckpt`` stays intact until the new one is complete.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

# What the last preemption did, for `lrl.cli` to report and turn into an exit code (one process, one run).
PREEMPTION: dict = {}
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, rename over ``path``, fsync the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on local filesystems (see `atomic_torch_save`)."""

    @override
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options}")
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoint_io(trainer) -> None:
    """Swap the strategy's default writer for `AtomicCheckpointIO` (a user-chosen plugin is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def checkpoint_loads(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint: a directory (sharded FSDP) with metadata, or a file that
    ``torch.load`` opens (memory-mapped: only the archive index is read, not the tensors)."""
    path = Path(path)
    if path.is_dir():
        return any(path.iterdir())
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - truncated, empty or foreign files all mean "does not load"
        return False
    return isinstance(ckpt, dict) and "state_dict" in ckpt


def resolve_last(dirs: list[str | os.PathLike]) -> tuple[Path | None, list[Path]]:
    """The checkpoint ``--ckpt_path last`` should resume: the newest ``*.ckpt`` in ``dirs`` (by modification
    time; ``last.ckpt`` wins a tie) that loads. Normally that is ``last.ckpt``; after a crash in the middle of a
    save it is the complete file written just before. Returns it (None if none loads) and the newer files that
    do not load, newest first."""
    candidates = []
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            candidates += [p for p in d.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")]
    candidates.sort(key=lambda p: (-p.stat().st_mtime_ns, not p.name.startswith("last")))
    broken = []
    for p in candidates:
        if checkpoint_loads(p):
            return p, broken
        broken.append(p)
    return None, broken


class RLCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that saves every ``every_n_rl_steps`` RL steps, at the end of training and on
    preemption, atomically, after flushing the step's metrics (module docstring).

    Args:
        every_n_rl_steps: period in RL steps (``LightningRLModule.rl_step``); 0 saves only at the end of
            training and on preemption.
        save_on_preemption: on SIGTERM / SIGUSR1 finish the current RL step, save (``last.ckpt`` when
            ``save_last``) and stop; ``lrl`` then exits with 128 + the signal number.
        **kwargs: `ModelCheckpoint` arguments (``dirpath``, ``filename``, ``save_last``, ``save_top_k``, ...);
            the optimizer-step and epoch triggers (``every_n_train_steps``, ``train_time_interval``,
            ``every_n_epochs``) are not accepted, and files are named ``rl_step=N.ckpt`` by default.
    """

    def __init__(self, every_n_rl_steps: int = 10, save_on_preemption: bool = True, **kwargs):
        for key in ("every_n_train_steps", "train_time_interval", "every_n_epochs", "save_on_train_epoch_end"):
            if kwargs.pop(key, None):
                raise MisconfigurationException(
                    f"RLCheckpoint.{key} is not supported: the cadence is every_n_rl_steps (RL steps)"
                )
        if not isinstance(every_n_rl_steps, int) or every_n_rl_steps < 0:
            raise MisconfigurationException(
                f"RLCheckpoint.every_n_rl_steps must be an int >= 0, got {every_n_rl_steps}"
            )
        if kwargs.get("filename") is None:  # the CLI passes None explicitly
            kwargs["filename"] = "{rl_step}" if kwargs.get("auto_insert_metric_name", True) else "rl_step={rl_step}"
        super().__init__(every_n_train_steps=0, every_n_epochs=0, save_on_train_epoch_end=False, **kwargs)
        self.every_n_rl_steps = every_n_rl_steps
        self.save_on_preemption = save_on_preemption
        self.last_rl_step_saved = -1
        self._rl_step_at_start = 0
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------------ setup and signals
    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer)

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._rl_step_at_start = _rl_step(pl_module)
        if self.save_on_preemption:
            PREEMPTION.clear()
            for sig in PREEMPTION_SIGNALS:
                self._previous_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, self._make_handler(trainer))

    def _make_handler(self, trainer):
        def handler(signum, frame):
            PREEMPTION.setdefault("signal", signum)
            previous = self._previous_handlers.get(signum)
            if signum == signal.SIGTERM and callable(previous):
                previous(signum, frame)  # Lightning's: sets trainer.received_sigterm (and tells other ranks)
            else:
                trainer._signal_connector._sigterm_notifier_fn(signum, frame)  # SIGUSR1: the same stop request

        return handler

    @override
    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    # ------------------------------------------------------------------ when to save
    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = _rl_step(pl_module)
        due = self.every_n_rl_steps > 0 and step % self.every_n_rl_steps == 0
        stop = self.save_on_preemption and trainer.received_sigterm
        if self.save_on_preemption and trainer.world_size > 1:
            # any rank signalled: all save now (saving is collective) and all stop after this step
            stop = trainer.strategy.reduce_boolean_decision(bool(stop), all=False)
            if stop:
                trainer._signal_connector.received_sigterm = True
        if due or stop:
            self._save_rl(trainer, pl_module, flush_step_metrics=True)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # the cadence is in RL steps only

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    @override
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # the stop request arrived after this step's batch-end hook: the step is complete, save it now
        if self.save_on_preemption and isinstance(exception, SIGTERMException):
            self._save_rl(trainer, pl_module, flush_step_metrics=False)
            PREEMPTION.setdefault("signal", signal.SIGTERM)
            PREEMPTION.update(rl_step=_rl_step(pl_module), path=self.last_model_path or self._last_checkpoint_saved)

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        if _rl_step(pl_module) != self._rl_step_at_start:  # a resumed, already finished run rewrites nothing
            self._save_rl(trainer, pl_module, flush_step_metrics=False)

    # ------------------------------------------------------------------ how to save
    def _save_rl(self, trainer, pl_module, *, flush_step_metrics: bool) -> None:
        step = _rl_step(pl_module)
        if step == self.last_rl_step_saved or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if flush_step_metrics:
            _log_step_metrics_now(trainer)
        _flush_loggers(trainer)
        candidates = self._monitor_candidates(trainer)
        candidates["rl_step"] = torch.tensor(step)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self.last_rl_step_saved = step
        rank_zero_info(f"RLCheckpoint: saved RL step {step} to {self._last_checkpoint_saved}")

    @override
    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_rl_step_saved": self.last_rl_step_saved}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.last_rl_step_saved = int(state_dict.get("last_rl_step_saved", -1))


def _rl_step(pl_module) -> int:
    step = getattr(pl_module, "rl_step", None)
    if step is None:
        raise MisconfigurationException(
            f"RLCheckpoint needs a module with an `rl_step` counter; {type(pl_module).__name__} has none "
            "(use lightning.pytorch.callbacks.ModelCheckpoint)"
        )
    return int(step)


def _log_step_metrics_now(trainer) -> None:
    """Write this step's logged metrics to the loggers now (before the checkpoint) instead of after the batch-end
    hooks, where Lightning writes them; the loop's own write of this step is then skipped, so nothing doubles."""
    connector = trainer._logger_connector
    if not hasattr(connector, "update_train_step_metrics") or "update_train_step_metrics" in vars(connector):
        rank_zero_warn("RLCheckpoint: cannot write this step's metrics before its checkpoint (Lightning changed)")
        return
    connector.update_train_step_metrics()

    def skip_once() -> None:
        del connector.update_train_step_metrics  # the class method is back for the next step

    connector.update_train_step_metrics = skip_once


def _flush_loggers(trainer) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.save()
        flush = getattr(getattr(logger, "experiment", None), "flush", None)
        if callable(flush):
            flush()
