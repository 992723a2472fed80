"""The `lrl` command: LightningCLI for `fit` / `validate` / `test` (no `predict`), plus `lrl serve`.

Model and data are chosen by ``class_path`` in the YAML (LightningRL and SFT share the CLI). Values that several
objects need have ONE source, given at the top level and linked into model and data with ``link_arguments``:
``checkpoint`` (model + tokenizer directory), ``block_size`` (rollout = training block size) and
``mask_token_id`` (override of the checkpoint's). The group size lives in the datamodule only.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

DESCRIPTION = (
    "lrl: LightningRL post-training of block-wise diffusion language models (SDAR / TraDo style), raising tokens "
    "per forward while keeping accuracy. Commands: `lrl fit` trains (LightningRL, GRPO or SFT, chosen by the "
    "config); `lrl validate` / `lrl test` run the accuracy-TPF Pareto sweep of a checkpoint; `lrl serve` serves a "
    "checkpoint over SGLang's HTTP API (`lrl serve --help`). Start with: lrl fit --config configs/quickstart.yaml"
)


class LRLCLI(LightningCLI):
    """LightningCLI with the project's shared arguments and links."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, without ``predict`` (the policy has no ``forward``/``predict_step``; generation and scoring
        are `lrl validate`)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict")
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--checkpoint",
            type=str,
            required=True,
            help="HF checkpoint directory of the policy (weights + tokenizer); shared by model and data",
        )
        parser.add_argument(
            "--block_size",
            type=int | None,
            default=None,
            help="Diffusion block size for rollout and training (default: the checkpoint's)",
        )
        parser.add_argument(
            "--mask_token_id",
            type=int | None,
            default=None,
            help="Override of the checkpoint's mask token id (must agree with the tokenizer)",
        )
        parser.add_argument("--base", type=str | None, default=None,
                            help="in a config file: the config it overlays, relative to its folder (e.g. "
                                 "`base: lightningrl.yaml`); `--config` reads the base first, unless an earlier "
                                 "`--config` already read it")
        parser.add_argument("--skip_plan", type=bool, default=False,
                            help="fit on a GPU: run even if the memory plan (`lrl plan`) says it does not fit")
        parser.add_argument("--collective_timeout_s", type=int | None, default=None,
                            help="seconds a rank waits in a collective (all-reduce, barrier) for the other ranks "
                                 "before the run fails: the process-group timeout of the DDP / FSDP strategy "
                                 "(None: Lightning's 1800 s; ignored on one device). Ranks roll out independently "
                                 "between collectives, so allow for the slowest rank's rollout and refill rounds")
        for key in ("checkpoint", "block_size", "mask_token_id"):
            parser.link_arguments(key, f"model.init_args.{key}")
            parser.link_arguments(key, f"data.init_args.{key}")

    def before_instantiate_classes(self) -> None:
        """Check the checkpoint directory before anything is built or written (a missing or truncated one would
        otherwise surface deep inside transformers, after the output folder was created)."""
        from lrl.cli_checks import check_config
        from lrl.cli_errors import check_checkpoint_dir

        config = self.config[self.subcommand] if self.subcommand else self.config
        model_args = (config.get("model") or {}).get("init_args") or {}
        if config.get("checkpoint") and not model_args.get("init_tiny"):  # SFT from scratch exports there instead
            check_checkpoint_dir(config["checkpoint"])
        check_config(config)
        if self.subcommand == "fit" and not config.get("skip_plan"):
            from lrl.plan.command import preflight

            preflight(config.as_dict())

    def _parse_ckpt_path(self) -> None:
        """Lightning re-reads a ``--ckpt_path`` file's hyperparameters here, before `before_instantiate_classes`:
        check the file first, so a truncated or foreign one is refused in one line (not a torch traceback)."""
        from lrl.cli_checks import check_ckpt_path

        subcommand = self.config.get("subcommand")
        if subcommand:
            check_ckpt_path(self.config[subcommand], subcommand)
        super()._parse_ckpt_path()

    def _check_resolved_last(self) -> None:
        """``--ckpt_path last``, once `_resolve_last` named the file: the checks `_parse_ckpt_path` ran for a path
        given as a file, before the trainer writes anything."""
        from lrl.cli_checks import check_ckpt_path

        raw = self.config[self.subcommand]
        view = {k: raw.get(k) for k in ("checkpoint", "block_size", "model", "data")}
        view["ckpt_path"] = self.config_init[self.subcommand].get("ckpt_path")
        check_ckpt_path(view, self.subcommand)

    def _load_data_early(self) -> None:
        """Read the dataset before the trainer starts, so bad files and rows fail before any output is written."""
        from datamodules.rollout import RolloutDataModule
        from lrl.cli_checks import check_budgets

        check_budgets(self.config[self.subcommand])
        if isinstance(self.datamodule, RolloutDataModule):
            self.datamodule.check_device(self.trainer.strategy.root_device)
            self.datamodule.setup("fit" if self.subcommand == "fit" else None)

    def before_validate(self) -> None:
        self._load_data_early()

    def before_test(self) -> None:
        self._load_data_early()

    def instantiate_trainer(self, **kwargs):
        """RL runs get a progress bar counted in RL steps (`callbacks.RLProgressBar`) instead of Lightning's
        per-epoch batch count, unless the config brings its own bar or disables it."""
        from lrl.cli_errors import RunStarted

        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RunStarted())  # errors before it fires are bad input: one line, exit 2
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_collective_timeout(trainer.strategy, config.get("collective_timeout_s"))
        from callbacks.checkpoint import RLCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, RLCheckpoint):
                cb.bind_dirpath(trainer)  # before --ckpt_path last looks in it
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        if getattr(getattr(self.model, "hparams", None), "max_rl_steps", None) is not None:
            from callbacks.rl_progress import RLProgressBar

            for i, cb in enumerate(trainer.callbacks):
                if type(cb) in (TQDMProgressBar, RichProgressBar):  # Lightning's default, not one the user configured
                    trainer.callbacks[i] = RLProgressBar()
        return trainer

    def before_fit(self) -> None:
        if self._resolve_last():
            self._check_resolved_last()
        self._load_data_early()

    def _resolve_last(self) -> bool:
        """Resolve ``--ckpt_path last`` ourselves: ``last.ckpt`` if it loads, else (with a warning naming it) the
        newest checkpoint that does; an error rather than Lightning's silent fresh start when there is none.
        Returns whether it resolved one."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return False
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities import rank_zero_warn

        from callbacks.checkpoint import resolve_last

        dirs = [cb.dirpath for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
        if not dirs or any(d is None for d in dirs):
            raise ValueError(
                "--ckpt_path last needs a ModelCheckpoint with a fixed `dirpath` (trainer.callbacks); otherwise "
                "Lightning looks in a new logger version folder and silently starts from scratch"
            )
        path, broken = resolve_last(dirs)
        if path is None:
            what = f"none of {[str(b) for b in broken]} loads" if broken else f"no checkpoint in {dirs}"
            raise FileNotFoundError(f"--ckpt_path last: {what}; nothing to resume from")
        if broken:
            rank_zero_warn(f"--ckpt_path last: {', '.join(map(str, broken))} does not load (truncated?); "
                           f"resuming from {path}, the newest checkpoint that loads")
        elif not path.name.startswith("last"):
            rank_zero_warn(f"--ckpt_path last: resuming from {path}, newer than last.ckpt (a save was interrupted)")
        config["ckpt_path"] = str(path)
        return True


# Lightning warnings that our design triggers on purpose (the training step pulls its own batch so rollouts stay
# on-policy; RolloutBatch moves its own tensors; the stream has a length for the progress bar; scripts with
# options of their own call `cli_main(args)` in-process, so sys.argv holds the script's arguments, not the CLI's).
_EXPECTED_WARNINGS = (
    r".*overridden `transfer_batch_to_device`.*",
    r".*`dataloader_iter`.*",
    r".*ModelCheckpoint with manual optimization.*",
    r".*`IterableDataset` has `__len__` defined.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
)


def apply_collective_timeout(strategy, seconds: int | None) -> None:
    """Set the process-group timeout of a DDP / FSDP strategy (``--collective_timeout_s``) before it creates the
    process group (at fit / validate start); other strategies have no process group and are left alone."""
    if seconds is None:
        return
    if not isinstance(seconds, int) or seconds < 1:
        raise ValueError(f"collective_timeout_s must be an int >= 1 (seconds), got {seconds!r}")
    if hasattr(strategy, "_timeout"):  # DDPStrategy, FSDPStrategy (and their subclasses) pass it to init_process_group
        from datetime import timedelta

        strategy._timeout = timedelta(seconds=seconds)


def cli_main(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> LRLCLI:
    """The LightningCLI of `lrl`. ``exit_on_error=False`` raises parser errors (``argparse.ArgumentError``)
    instead of printing the usage and exiting: `main` reports them in one short block."""
    import warnings

    from lrl.config_files import expand_config_args

    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = expand_config_args(list(sys.argv[1:] if args is None else args))  # overlays read their `base:` first
    return LRLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": exit_on_error, "description": DESCRIPTION},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        from lrl.serve import main as serve_main

        serve_main(args[1:])
        return
    if args and args[0] == "plan":
        from lrl.plan.command import main as plan_main

        sys.exit(plan_main(args[1:]))
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lrl import cli_errors

    cli_errors.reset()
    try:
        cli_main(argv, exit_on_error=cli_errors.debug_requested())  # None: sys.argv
    except SIGTERMException:
        sys.exit(_preempted_exit())
    except Exception as exc:  # noqa: BLE001 - bad input gets one line; everything else keeps its traceback
        if cli_errors.debug_requested() or not cli_errors.is_user_error(exc):
            raise
        given = list(sys.argv[1:] if argv is None else argv)
        print(f"lrl: error: {cli_errors.user_message(exc, given)}", file=sys.stderr)
        sys.exit(cli_errors.EXIT_USAGE)


def _preempted_exit() -> int:
    """Report a preemption (SIGTERM / SIGUSR1) and return its exit code, 128 + the signal number."""
    import signal

    from callbacks.checkpoint import PREEMPTION

    signum = int(PREEMPTION.get("signal", signal.SIGTERM))
    name = signal.Signals(signum).name
    if PREEMPTION.get("path"):
        print(f"lrl: stopped by {name} after RL step {PREEMPTION.get('rl_step')}; saved {PREEMPTION['path']}; "
              "continue with --ckpt_path last", file=sys.stderr)
    else:
        print(f"lrl: stopped by {name}; no RLCheckpoint callback saved the run", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    main()
