"""Bad input reaches the `lrl` user as one short message naming the key as written, with exit code 2.

Errors raised while the command is being set up (config parsing, instantiating model / data / trainer,
checking the checkpoint directory, loading data and weights) are the user's input, not bugs: `lrl` prints
``lrl: error: <message>`` and exits 2, without a traceback unless ``LRL_DEBUG=1``. Errors after training (or
evaluation) has started keep their traceback. Messages of our validators say ``model.lr`` / ``data.group_size``;
on the command line and in YAML those keys are ``model.init_args.lr`` / ``data.init_args.group_size``, so they are
rewritten to the spelling the user wrote.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lightning.pytorch import Callback

EXIT_USAGE = 2
_STATE = {"started": False}  # set once fit / validate / test is past setup (then errors keep their traceback)
# (a weight name such as model.layers.0.mlp.gate_proj.weight is not a config key and is left as it is)
_SHORT_KEY = re.compile(r"(?<![\w./-])(model|data)\.(?!init_args\b|class_path\b|[\w.]*\.(?:weight|bias)\b)"
                        r"([A-Za-z_]\w*)")


class RunStarted(Callback):
    """Marks the end of setup: from here on an exception is a failure of the run, shown with its traceback."""

    def on_fit_start(self, trainer, pl_module) -> None:
        _STATE["started"] = True

    def on_validation_start(self, trainer, pl_module) -> None:
        _STATE["started"] = True

    def on_test_start(self, trainer, pl_module) -> None:
        _STATE["started"] = True


def reset() -> None:
    _STATE["started"] = False


def debug_requested() -> bool:
    return os.environ.get("LRL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _user_error_types() -> tuple[type[BaseException], ...]:
    import argparse

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    types: list[type[BaseException]] = [
        ValueError, TypeError, OSError, KeyError, MisconfigurationException, argparse.ArgumentError,
    ]
    try:
        from safetensors import SafetensorError

        types.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        pass
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input met during setup (reported in one line) rather than a failure of the run."""
    return not _STATE["started"] and isinstance(exc, _user_error_types())


def user_message(exc: BaseException, argv: list[str] = (), max_lines: int = 6) -> str:
    """The innermost cause of ``exc`` (jsonargparse wraps our validators' errors in a dump of the whole config),
    with short keys rewritten to ``model.init_args.X`` / ``data.init_args.X``, cut to ``max_lines`` lines.
    Parser errors are reduced to the key (as spelled in ``argv`` when it is there) and what was wrong."""
    import argparse

    if isinstance(exc, argparse.ArgumentError):
        return _parser_message(str(exc), argv)
    root = exc
    while root.__cause__ is not None and _is_wrapper(root):
        root = root.__cause__
    msg = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
    msg = msg.strip() or type(root).__name__
    if isinstance(root, SyntaxError | json.JSONDecodeError) or type(root).__module__.startswith("safetensors"):
        msg = f"{type(root).__name__}: {msg}"
    msg = _SHORT_KEY.sub(r"\1.init_args.\2", msg)
    lines = [line for line in msg.splitlines() if line.strip()]
    if len(lines) > max_lines:
        lines = lines[:max_lines] + ["... (LRL_DEBUG=1 shows everything)"]
    return "\n".join(lines)


# jsonargparse's union / subclass wrappers: lines that describe its machinery, not the user's mistake
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
                 "Expected a <class 'NoneType'>", "Problem with given class_path", "tip:")


# keys and callbacks that moved (their old spelling is refused with a pointer to the new one)
_MOVED = {
    **dict.fromkeys(("acc_reward", "tpf_reward", "tpf_coefficient", "step_penalty", "step_penalty_scale",
                     "step_penalty_norm", "distill_teacher", "distill_coefficient", "distill_norm"),
                    "moved to data.init_args.rewards, a list of reward terms: docs/rewards.md"),
    "TPFAwareFilter": "moved to data.init_args.filter: docs/rl_step.md",
    "WeightSync": "weight sync is on by default, data.init_args.sync_every_n_steps: docs/rl_step.md",
}


def _moved_hint(msg: str) -> str:
    found = [hint for name, hint in _MOVED.items() if re.search(rf"'{name}'", msg)]
    return f"; {found[0]}" if found else ""


def _parser_message(msg: str, argv) -> str:
    keys = re.findall(r'Parser key "([^"]+)"', msg)
    unknown = re.findall(r"Option '([^']+)' is not accepted", msg)
    details = []
    for line in msg.splitlines():
        line = re.sub(r'^(error: )?Parser key "[^"]+":\s*', "", line.strip().lstrip("-").strip())
        if line and not line.startswith(_PARSER_NOISE) and line not in details:
            details.append(line)
    name = unknown[-1] if unknown else (keys[-1] if keys else None)
    key = None
    for token in argv:  # the spelling the user typed, e.g. --model.init_args.learning_rate=1
        m = re.match(r"--([\w.]+)", str(token))
        if name and m and (m.group(1) == name or m.group(1).endswith("." + name)):
            key = m.group(1)
    if key is None and keys:
        key = keys[0] if len(keys) == 1 else f"{keys[0]}.init_args.{'.'.join(keys[1:])}"
    text = ("; ".join(details[:4]) or msg.strip().splitlines()[0]) + _moved_hint(msg)
    return f"{key}: {text}" if key else text


def _is_wrapper(exc: BaseException) -> bool:
    """jsonargparse re-raises our validators' errors inside a description of the whole config value."""
    text = str(exc)
    return type(exc).__module__.startswith("jsonargparse") or "Given value" in text or "Union subtypes" in text


def check_checkpoint_dir(path: str | os.PathLike, key: str = "checkpoint") -> None:
    """Fail early, naming ``key``, when ``path`` is not a complete HF checkpoint directory: missing, no or
    unreadable ``config.json``, no weights, a missing shard, or a safetensors file whose header does not match its
    size (truncated), or weights that do not match config.json (`lrl.models.loading.check_weights`: missing,
    extra, wrong shape, non-float, NaN/inf; the values are read once, memory-mapped)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist (a local HF checkpoint directory; nothing is "
                                "downloaded)")
    if not p.is_dir():
        raise NotADirectoryError(f"{key}: {path} is not a directory (give the HF checkpoint directory)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{key}: {path} has no config.json; is it a checkpoint directory?")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{key}: {cfg} is not valid JSON ({exc})") from None
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{key}: {index} is not a valid safetensors index ({exc})") from None
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{key}: {path} lacks weight shard(s) {missing} listed in {index.name}")
        files = [p / s for s in shards]
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files and not list(p.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{key}: {path} holds no weights (*.safetensors or pytorch_model*.bin)")
    for f in files:
        _check_safetensors_header(f, key)
    if files:
        from lrl.models.loading import check_weights

        check_weights(p, files, key=key)  # names, shapes, dtypes against config.json; no NaN / inf


def _check_safetensors_header(path: Path, key: str) -> None:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{key}: {path} is not a valid safetensors file ({exc})") from None
    if 8 + n + end != size:
        raise ValueError(f"{key}: {path} is truncated or corrupt: its header describes {8 + n + end} bytes, the "
                         f"file has {size}")
