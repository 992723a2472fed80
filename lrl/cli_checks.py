"""Checks of a parsed `lrl` config and of ``--ckpt_path`` that need more than one object, or the checkpoint's files,
run by `lrl.cli.LRLCLI` before anything is instantiated or written (errors name the key as the user writes it).

* `check_config`: model knobs that `LightningRLModule` does not range-check itself, and settings that only make
  sense together with the checkpoint (a planner strategy needs a planner head; the generation budgets fit the
  model's context).
* `check_ckpt_path`: ``--ckpt_path`` is a readable Lightning checkpoint of this model (not truncated, not a text
  file, not the weights of another architecture or vocabulary), and a resumed ``fit`` keeps the settings its run
  was trained with (group size, block size, base model, task).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

_RL_MODULE = "LightningRLModule"
_ROLLOUT_DATA = "RolloutDataModule"
_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def _section(config, name: str) -> tuple[str, dict]:
    """(class_path, init_args) of the ``model`` / ``data`` section."""
    sec = config.get(name) or {}
    return str(sec.get("class_path") or ""), dict(sec.get("init_args") or {})


def _eval(model: dict):
    """``model.init_args.eval`` as an `EvalConfig` (defaults filled in). `_section`'s dict of a parsed namespace
    holds the group's fields flattened (``eval.max_new_tokens``)."""
    from lrl.evaluation.config import as_eval_config

    flat = {k.split(".", 1)[1]: v for k, v in model.items() if k.startswith("eval.")}
    return as_eval_config(model.get("eval") if "eval" in model else flat or None)


def check_config(config) -> None:
    """Refuse model/data values that are out of range or do not fit the checkpoint (``config`` = the parsed
    subcommand config; the checkpoint directory was checked already)."""
    from lrl.models.loading import read_config
    from lrl.models.planner import PLANNER_CONFIG_KEY

    model_cls, model = _section(config, "model")
    data_cls, data = _section(config, "data")
    if model_cls.endswith(_RL_MODULE):
        for key, low, strict in (("warmup_steps", 0, False), ("max_grad_norm", 0, False), ("weight_decay", 0, False),
                                 ("adam_eps", 0, True), ("max_skipped_steps", 0, False)):
            value = model.get(key)
            if value is None:
                continue
            if (value <= low) if strict else (value < low):
                raise ValueError(f"model.{key} must be {'>' if strict else '>='} {low}, got {value}")
        _eval(model).check("model.init_args.eval")
    ckpt = config.get("checkpoint")
    if not ckpt or model.get("init_tiny"):
        return
    raw = read_config(ckpt)
    has_head = PLANNER_CONFIG_KEY in raw or bool(model.get("planner_head"))
    if not has_head:
        if data_cls.endswith(_ROLLOUT_DATA) and data.get("remasking_strategy") == "planner":
            raise ValueError(f"data.remasking_strategy=planner needs a planner head: {ckpt} has none and "
                             "model.planner_head is null")
        if model_cls.endswith(_RL_MODULE) and _eval(model).planner_thresholds:
            raise ValueError(f"model.init_args.eval.planner_thresholds needs a planner head: {ckpt} has none and "
                             "model.planner_head is null")
        if model.get("freeze_backbone"):
            raise ValueError(f"model.freeze_backbone=true trains the planner head only, but {ckpt} has none and "
                             "model.planner_head is null")
    block = config.get("block_size")
    trained_at = raw.get("block_size")
    if model_cls.endswith(_RL_MODULE) and block is not None and block > 0 and trained_at not in (None, block):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"block_size={block} differs from the block size {raw['block_size']} that {ckpt} was trained "
                       "at (config.json): the policy decodes off its training distribution")


def check_budgets(config) -> None:
    """Before a run (not when a config is only instantiated): the evaluation's generation budget fits the model's
    context (the rollout's, ``data.max_new_tokens``, is checked by `RolloutDataModule.setup`)."""
    from lrl.models.loading import read_config

    model_cls, model = _section(config, "model")
    ckpt = config.get("checkpoint")
    if not model_cls.endswith(_RL_MODULE) or not ckpt or model.get("init_tiny"):
        return
    context = read_config(ckpt).get("max_position_embeddings")
    budget = _eval(model).max_new_tokens
    if context is not None and budget > context:
        raise ValueError(f"model.init_args.eval.max_new_tokens={budget} exceeds the context of {ckpt} "
                         f"(max_position_embeddings {context})")


def _load_ckpt(path: Path, key: str) -> dict:
    import torch

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{key}: {path} is not a Lightning checkpoint (no torch zip archive: truncated, or "
                         "another kind of file)")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read is bad input here
        raise ValueError(f"{key}: {path} does not load as a checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{key}: {path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def check_ckpt_path(config, subcommand: str, key: str = "--ckpt_path") -> None:
    """Refuse a ``--ckpt_path`` that cannot be what the run needs: missing, not a checkpoint (truncated, text), the
    weights of another model (names or shapes differ from ``--checkpoint``'s), or for ``fit`` (resume) a run trained
    with a different ``data.init_args.group_size``, ``block_size``, base ``checkpoint`` or ``data.init_args.task``.
    Sharded (directory) checkpoints are checked for existence only."""
    path = config.get("ckpt_path")
    if not path or str(path) in _SPECIAL_CKPT:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    if p.is_dir():
        return
    ckpt = _load_ckpt(p, key)
    model_cls, model = _section(config, "model")
    if model_cls.endswith(_RL_MODULE):
        _check_loss_group(ckpt, path, key)
        _check_eval_group(ckpt, path, key)
    if not model_cls.endswith(_RL_MODULE) or not config.get("checkpoint"):
        return
    _check_same_model(ckpt, config["checkpoint"], path, key)
    if subcommand == "fit":
        _check_same_run(ckpt, config, path)


def _check_loss_group(ckpt: dict, path, key: str) -> None:
    """A checkpoint written before the loss knobs became one group holds them at the top of its hyperparameters,
    which Lightning would pass to the module as unknown arguments: refuse it naming the move."""
    from dataclasses import fields

    from lrl.algorithms.losses import LossConfig

    flat = sorted(set(ckpt.get("hyper_parameters") or {}) & {f.name for f in fields(LossConfig)})
    if flat:
        raise ValueError(f"{key}: {path} was saved before the loss knobs became model.init_args.loss (its "
                         f"hyperparameters hold {', '.join(flat)} at the top level); move them under "
                         "hyper_parameters['loss'] as docs/rl_step.md shows, or use the code it was trained with")


def _check_eval_group(ckpt: dict, path, key: str) -> None:
    """The same for the evaluation knobs (``eval_thresholds`` … before they became ``model.init_args.eval``)."""
    from dataclasses import fields

    from lrl.evaluation.config import EvalConfig

    old = {f"eval_{f.name}" for f in fields(EvalConfig)}
    flat = sorted(set(ckpt.get("hyper_parameters") or {}) & old)
    if flat:
        raise ValueError(f"{key}: {path} was saved before the evaluation knobs became model.init_args.eval (its "
                         f"hyperparameters hold {', '.join(flat)}); move them under hyper_parameters['eval'] "
                         "without the eval_ prefix as docs/evaluation.md shows, or use the code it was trained with")


def _check_same_model(ckpt: dict, base: str, path, key: str) -> None:
    from lrl.models.loading import expected_weights

    expected, optional = expected_weights(base)
    prefix = "policy.model."
    saved = {k[len(prefix):]: tuple(v.shape) for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if (ckpt.get("lrl") or {}).get("lora") is not None:  # LoRA: adapters only (the base comes from `base`)
        for name, shape in saved.items():
            layer, _, rest = name.partition(".lora_")
            want = expected.get(f"{layer}.weight")
            got = shape[1] if rest.startswith("A.") else shape[0]  # A: r × in, B: out × r
            if want is None or got != (want[1] if rest.startswith("A.") else want[0]):
                raise ValueError(f"{key}: {path} holds LoRA adapters of another model ({name} {list(shape)} does "
                                 f"not fit {base})")
        return
    missing = sorted(set(expected) - set(saved) - optional)
    if missing:
        raise ValueError(f"{key}: {path} holds no policy weights of the model {base} describes (missing e.g. "
                         f"{missing[:2]}): a checkpoint of another model?")
    for name, shape in saved.items():
        if name in expected and shape != expected[name]:
            raise ValueError(f"{key}: {path} is a checkpoint of another model: {name} has shape {list(shape)}, "
                             f"{base} describes {list(expected[name])} (checkpoint / vocabulary differ)")


def _check_same_run(ckpt: dict, config, path) -> None:
    from lrl.models.loading import read_config

    saved_model = ckpt.get("hyper_parameters") or {}
    saved_data = ckpt.get("datamodule_hyper_parameters") or {}
    _, data = _section(config, "data")
    base = config["checkpoint"]

    def differs(name: str, old, new) -> None:
        if old != new:
            raise ValueError(f"{name}: resuming {path}, trained with {name}={old!r}, but this run sets {new!r}; "
                             "resume with the same value (or start a new run)")

    if "group_size" in saved_data and "group_size" in data:
        differs("data.init_args.group_size", saved_data["group_size"], data["group_size"])
    if "task" in saved_data and "task" in data:
        differs("data.init_args.task", saved_data["task"], data["task"])
    if "checkpoint" in saved_model:
        old, new = os.path.realpath(str(saved_model["checkpoint"])), os.path.realpath(str(base))
        differs("checkpoint", old, new)
    if "block_size" in saved_model:
        default = read_config(base).get("block_size")
        old = saved_model["block_size"] if saved_model["block_size"] is not None else default
        new = config.get("block_size") if config.get("block_size") is not None else default
        differs("block_size", old, new)
