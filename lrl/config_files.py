"""The YAML side of ``lrl fit --config A --config B ...`` for scripts and ``lrl plan``: the files merged as the CLI
merges them (`merged_config`), without building anything, and the ``base:`` key that makes a config an overlay
(`expand_bases`). A bottom-layer module: it imports no other part of lrl (a typed group's class is imported by its
``class_path`` only when a merge needs to know its groups).
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_KEY = "base"


def _base_of(path: Path) -> Path | None:
    """The file named by ``path``'s top-level ``base:`` key (relative to ``path``'s folder), or None."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None  # not ours to report: the CLI's own parser names the bad file
    base = loaded.get(BASE_KEY) if isinstance(loaded, dict) else None
    if base is None:
        return None
    if not isinstance(base, str):
        raise ValueError(f"{path}: {BASE_KEY} must be the path of the config this one overlays, got {base!r}")
    target = (path.parent / base).resolve()
    if not target.is_file():
        raise ValueError(f"{path}: {BASE_KEY}: {base} does not exist (looked for {target})")
    return target


def _bases(path: Path) -> list[Path]:
    """``path``'s ``base:`` chain, the root first (``path`` itself not included)."""
    chain = [path.resolve()]
    while (base := _base_of(chain[-1])) is not None:
        if base in chain:
            raise ValueError(f"{BASE_KEY}: configs overlay each other in a circle: "
                             + " -> ".join(str(p) for p in (*chain, base)))
        chain.append(base)
    return chain[:0:-1]


def expand_bases(paths: list[str | os.PathLike]) -> list[str]:
    """The config files in the order the CLI reads them, each overlay preceded by its ``base:`` chain.

    A config with ``base: lightningrl.yaml`` holds only what it changes; ``--config overlay.yaml`` reads the base
    first. A base already read earlier in the list is not read again, so ``--config lightningrl.yaml --config
    model/tiny.yaml --config grpo_traj.yaml`` keeps the tiny model (re-reading the base would undo it).
    """
    out: list[str] = []
    seen: set[Path] = set()
    for p in paths:
        for base in _bases(Path(p)) if Path(p).is_file() else []:
            if base not in seen:
                seen.add(base)
                out.append(str(base))
        seen.add(Path(p).resolve())
        out.append(str(p))
    return out


def expand_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``--config FILE`` (or ``--config=FILE``) preceded by the ``--config``
    of its ``base:`` chain (`expand_bases`). Values that are not files (a YAML string) pass through."""
    out: list[str] = []
    given: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            value, i = args[i].split("=", 1)[1], i + 1
        else:
            out.append(args[i])
            i += 1
            continue
        files = expand_bases([*given, value]) if Path(value).is_file() else [*given, value]
        for path in files[len(expand_bases(given)):]:
            out += ["--config", path]
        given.append(value)
    return out


def merged_config(paths: list[str]) -> dict:
    """What ``lrl fit --config A --config B ...`` reads from YAML: later files override earlier ones key by key.

    For scripts that need a few values (checkpoint, block size, thresholds) of the same composition they pass on
    to the CLI. Sections and class configurations (``class_path`` / ``init_args``) merge recursively, as
    jsonargparse merges them, and so do typed argument groups (an ``__init__`` argument annotated with a
    dataclass, e.g. ``model.init_args.loss``); the value of any other argument is replaced whole, a dictionary too
    (a later ``task_kwargs: {styles: ...}`` drops the earlier ``task_kwargs``, as the CLI does), and so are lists
    and scalars.
    """
    import yaml

    def merge(a: dict, b: dict, groups: set[str] | None = None) -> dict:
        """``groups``: None when ``a`` and ``b`` are sections; when they are the contents of an ``init_args``, the
        names of the class's typed argument groups."""
        out = dict(a)
        for key, value in b.items():
            both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
            if both_dicts and groups is None and key == "init_args":
                out[key] = merge(out[key], value, _typed_groups(b.get("class_path") or a.get("class_path")))
            elif both_dicts and (groups is None or key in groups or {"class_path", "init_args"} & set(value)):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    cfg: dict = {}
    for path in expand_bases(paths):
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping, got {type(loaded).__name__}")
        cfg = merge(cfg, loaded)
    cfg.pop(BASE_KEY, None)
    return cfg


def _typed_groups(class_path: str | None) -> set[str]:
    """The ``__init__`` arguments of ``class_path`` annotated with a dataclass, or a union with one (empty when it
    does not import)."""
    import dataclasses
    import importlib
    import typing

    module, _, name = str(class_path or "").rpartition(".")
    try:
        hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    except Exception:  # noqa: BLE001 - a class we cannot inspect has no groups we know of
        return set()
    # ``RolloutBackend | None`` is a typed group too: jsonargparse merges it key by key
    return {k for k, v in hints.items()
            if dataclasses.is_dataclass(v) or any(dataclasses.is_dataclass(a) for a in typing.get_args(v))}
