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
  (`AtomicCheckpointIO`): the previous ``last.ckpt`` stays intact until the new one is complete; an FSDP sharded
  checkpoint (a directory written by every rank) goes to a hidden directory beside it, is checked loadable and
  renamed into place;
* retention: the newest ``keep_last`` numbered checkpoints (by RL step) are kept, and with ``save_last: link``
  ``last.ckpt`` is a symbolic link to the newest one (replaced atomically), not a second full copy.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from typing_extensions import override

from lrl.atomic import atomic_symlink, atomic_torch_save, replace_dir

# What the last preemption did, for `lrl.cli` to report and turn into an exit code (one process, one run).
PREEMPTION: dict = {}
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on local filesystems (`lrl.atomic.atomic_torch_save`)."""

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


SHARDED_META = "meta.pt"  # Lightning's file of the non-tensor state in a sharded checkpoint directory
DCP_META = ".metadata"  # torch.distributed.checkpoint's index of the shards


def checkpoint_loads(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint: a sharded FSDP directory whose shard index exists and whose
    Lightning state (``meta.pt``) loads, or a file that ``torch.load`` opens (memory-mapped: only the archive
    index is read, not the tensors) holding a ``state_dict``."""
    path = Path(path)
    if path.is_dir():
        if not (path / DCP_META).is_file():
            return False
        try:
            meta = torch.load(path / SHARDED_META, map_location="cpu", mmap=True, weights_only=False)
        except Exception:  # noqa: BLE001 - missing or truncated: does not load
            return False
        return isinstance(meta, dict)
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
    candidates = [p for p in candidates if p.exists()]  # a ``last`` link whose target is gone does not count
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
        keep_last: how many numbered checkpoints (``rl_step=N.ckpt``) stay on disk: the newest ``keep_last`` by
            RL step; -1 keeps every one, 0 none (only ``last.ckpt``, then a full file). Replaces
            `ModelCheckpoint`'s ``save_top_k`` / ``monitor``.
        **kwargs: `ModelCheckpoint` arguments (``dirpath``: default ``<trainer.default_root_dir>/checkpoints``,
            fixed before ``--ckpt_path last`` looks for it, so a config that sets ``default_root_dir`` resumes
            from its own folder; ``filename``, ``save_last``: ``link`` makes
            ``last.ckpt`` a link to the newest numbered checkpoint, ``true`` a full copy); the optimizer-step and
            epoch triggers (``every_n_train_steps``, ``train_time_interval``, ``every_n_epochs``) and
            ``save_top_k`` / ``monitor`` / ``mode`` are not accepted, and files are named ``rl_step=N.ckpt``.
    """

    def __init__(self, every_n_rl_steps: int = 10, save_on_preemption: bool = True, keep_last: int = 2, **kwargs):
        for key in ("every_n_train_steps", "train_time_interval", "every_n_epochs", "save_on_train_epoch_end"):
            if kwargs.pop(key, None):
                raise MisconfigurationException(
                    f"RLCheckpoint.{key} is not supported: the cadence is every_n_rl_steps (RL steps)"
                )
        # the CLI fills in ModelCheckpoint's defaults (save_top_k 1, monitor None, mode "min"): only others are refused
        for key, default in (("save_top_k", 1), ("monitor", None), ("mode", "min")):
            if kwargs.pop(key, default) not in (None, default):
                raise MisconfigurationException(
                    f"RLCheckpoint.{key} is not supported: retention is keep_last (the newest K by RL step)"
                )
        if not isinstance(every_n_rl_steps, int) or every_n_rl_steps < 0:
            raise MisconfigurationException(
                f"RLCheckpoint.every_n_rl_steps must be an int >= 0, got {every_n_rl_steps}"
            )
        if not isinstance(keep_last, int) or keep_last < -1:
            raise MisconfigurationException(f"RLCheckpoint.keep_last must be an int >= -1, got {keep_last}")
        if kwargs.get("filename") is None:  # the CLI passes None explicitly
            kwargs["filename"] = "{rl_step}" if kwargs.get("auto_insert_metric_name", True) else "rl_step={rl_step}"
        # "the newest K" is top-K of the RL step: ModelCheckpoint's own bookkeeping (saved in the checkpoint, so a
        # resumed run keeps deleting the oldest) does the retention
        super().__init__(every_n_train_steps=0, every_n_epochs=0, save_on_train_epoch_end=False,
                         monitor="rl_step", mode="max", save_top_k=keep_last, **kwargs)
        self.keep_last = keep_last
        self.every_n_rl_steps = every_n_rl_steps
        self.save_on_preemption = save_on_preemption
        self.last_rl_step_saved = -1
        self._rl_step_at_start = 0
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------------ setup and signals
    def bind_dirpath(self, trainer) -> None:
        """``dirpath`` None → ``<trainer.default_root_dir>/checkpoints`` (Lightning's own default is inside the
        logger's version folder, which ``--ckpt_path last`` cannot know before the run)."""
        if self.dirpath is None:
            self.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def _claim_last_name(self) -> None:
        """``last.ckpt`` is always this run's to replace (atomically): without a ``last_model_path`` (a fresh run, or
        one resumed from a checkpoint written before the first ``last``), Lightning's version counter would write
        ``last-v1.ckpt`` beside an existing one."""
        if self.save_last and not self.last_model_path and self.dirpath:
            self.last_model_path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.bind_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        self._claim_last_name()
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
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        if getattr(trainer.strategy, "_state_dict_type", None) != "sharded":
            return super()._save_checkpoint(trainer, filepath)  # a file: AtomicCheckpointIO writes it atomically
        save_sharded_atomically(trainer, filepath, self.save_weights_only)
        # what ModelCheckpoint._save_checkpoint records after its write
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    @override
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        # Lightning's removes the old link and then creates the new one: a kill in between leaves no last.ckpt
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_symlink(filepath, linkpath)
        trainer.strategy.barrier()

    @override
    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_rl_step_saved": self.last_rl_step_saved}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.last_rl_step_saved = int(state_dict.get("last_rl_step_saved", -1))
        self._claim_last_name()


def save_sharded_atomically(trainer, filepath: str | os.PathLike, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` of a sharded strategy (every rank writes its shards into a directory) into a
    hidden ``.<name>.tmp`` beside ``filepath``, checked loadable (`checkpoint_loads`) and renamed into place
    (`lrl.atomic.replace_dir`) by rank 0: a save that fails or is killed part-way leaves the previous checkpoint
    as it was. FSDP's own save writes into the target directory in place. A collective: every rank calls it."""
    final = Path(filepath)
    tmp = final.with_name(f".{final.name}.tmp")  # the same name on every rank (a random one would differ)
    strategy = trainer.strategy
    if trainer.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save killed earlier
    strategy.barrier("lrl_sharded_save_start")
    try:
        trainer.save_checkpoint(str(tmp), weights_only)
        strategy.barrier("lrl_sharded_save_written")
        if trainer.is_global_zero:
            if not checkpoint_loads(tmp):
                raise RuntimeError(f"RLCheckpoint: the sharded checkpoint written to {tmp} does not load; "
                                   f"{final} is left as it was")
            replace_dir(tmp, final)
    except BaseException:
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    strategy.barrier("lrl_sharded_save_done")


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
