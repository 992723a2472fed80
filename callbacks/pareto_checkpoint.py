"""`ParetoFrontierCheckpoint`: periodic accuracy–TPF evaluation; keep the checkpoints on the frontier."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lrl.models.sharding import unwrap


class ParetoFrontierCheckpoint(Callback):
    """Every ``every_n_steps`` RL steps, run the Pareto sweep (`lrl.evaluation`) on the held-out split, log
    ``pareto/aup``, ``pareto/acc@φ``, ``pareto/tpf@φ`` (``pareto/sound@φ`` for tasks that check worked steps) and
    the frontier plot to TensorBoard, and save an HF checkpoint of the policy. Of the evaluated checkpoints only
    those on the frontier of (TPF, accuracy) at the ``select_threshold`` decoding setting, plus the best-AUP one,
    are kept on disk (``keep: frontier``), or the best-AUP one alone (``keep: best``: one HF copy on disk).

    Args:
        dirpath: where checkpoints and ``pareto.json`` files go (default: ``<log_dir>/pareto``).
        every_n_steps: evaluation period in RL steps.
        eval_size: held-out records evaluated (None: the datamodule's whole eval set).
        thresholds: dynamic thresholds of the sweep (None: the module's ``eval.thresholds``).
        select_threshold: decoding setting whose (TPF, accuracy) defines the frontier of checkpoints.
        evaluate_at_start: also evaluate the initial policy (the "before" point).
        keep: which evaluated checkpoints stay on disk: ``frontier`` (the frontier plus the best AUP) or ``best``
            (the best AUP only).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int = 10,
        eval_size: int | None = None,
        thresholds: list[float] | None = None,
        select_threshold: float = 0.9,
        evaluate_at_start: bool = True,
        keep: Literal["frontier", "best"] = "frontier",
    ):
        if every_n_steps < 1:
            raise MisconfigurationException(f"ParetoFrontierCheckpoint.every_n_steps must be >= 1, got {every_n_steps}")
        if keep not in ("frontier", "best"):
            raise MisconfigurationException(f"ParetoFrontierCheckpoint.keep must be 'frontier' or 'best', got {keep!r}")
        self.keep = keep
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.eval_size = eval_size
        self.thresholds = thresholds
        self.select_threshold = select_threshold
        self.evaluate_at_start = evaluate_at_start
        self.history: list[dict] = []  # one entry per evaluation: step, aup, acc, tpf, path, kept

    def _dir(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "pareto"

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if self.evaluate_at_start and not self.history:
            self._evaluate(trainer, pl_module, at_start=True)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.rl_step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module, at_start: bool = False) -> None:
        dm = trainer.datamodule
        records = dm.eval_records[: self.eval_size] if self.eval_size else dm.eval_records
        result = pl_module.run_pareto(dm.task, records, thresholds=self.thresholds,
                                      stop_token_ids=getattr(dm, "stop_ids", None))
        step = int(pl_module.rl_step)
        metrics = {"pareto/aup": result.aup}
        sel = result.point(self.select_threshold) or result.points[-1]
        for p in result.points:
            key = "static" if p.threshold is None else f"{p.threshold:g}"
            metrics[f"pareto/acc@{key}"] = p.accuracy
            metrics[f"pareto/tpf@{key}"] = p.tpf
            if p.sound_accuracy is not None:  # right answers over worked steps that hold (the synthetic task)
                metrics[f"pareto/sound@{key}"] = p.sound_accuracy
        if at_start:  # Lightning forbids step-level self.log in on_train_start: write to the loggers directly
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        else:
            pl_module.log_dict(metrics, on_step=True, batch_size=len(records))
        weights = pl_module.gathered_policy_state()  # FSDP: gathered on every rank before rank 0 writes them
        self._save(trainer, pl_module, result, step, sel, weights)

    @rank_zero_only
    def _save(self, trainer, pl_module, result, step: int, sel, weights) -> None:
        import json

        from lrl.atomic import atomic_write
        from lrl.evaluation import write_pareto
        from lrl.evaluation.pareto import plot_pareto
        from lrl.metrics import pareto_frontier
        from lrl.models import save_checkpoint

        out = self._dir(trainer)
        step_dir = out / f"step-{step:06d}"
        write_pareto(result, step_dir, title=f"step {step}")
        save_checkpoint(unwrap(pl_module.policy), step_dir / "model", tokenizer=pl_module.tokenizer, state_dict=weights)
        self.history.append(
            {
                "step": step,
                "aup": result.aup,
                "acc": sel.accuracy,
                "tpf": sel.tpf,
                "path": str(step_dir / "model"),
                "kept": True,
            }
        )
        pts = [(h["tpf"], h["acc"]) for h in self.history]
        front = set(pareto_frontier(pts))
        best = max(range(len(self.history)), key=lambda i: self.history[i]["aup"])
        for i, h in enumerate(self.history):
            keep = i == best or (self.keep == "frontier" and i in front)
            if h["kept"] and not keep:
                shutil.rmtree(h["path"], ignore_errors=True)
                h["kept"] = False
        atomic_write(out / "frontier.json",
                     json.dumps({"history": self.history, "best_aup_step": self.history[best]["step"]}, indent=2))
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_figure"):
            exp.add_figure("pareto/frontier", plot_pareto(result, title=f"step {step}"), trainer.global_step)

    @override
    def state_dict(self) -> dict:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
