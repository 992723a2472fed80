"""The YAML side of ``lrl fit --config A --config B ...`` for scripts and ``lrl plan``: the files merged as the CLI
merges them (`merged_config`), without building anything. A bottom-layer module: it imports no other part of lrl
(a typed group's class is imported by its ``class_path`` only when a merge needs to know its groups).
"""

from __future__ import annotations


def merged_config(paths: list[str]) -> dict:
    """What ``lrl fit --config A --config B ...`` reads from YAML: later files override earlier ones key by key.

    For scripts that need a few values (checkpoint, block size, thresholds) of the same composition they pass on
    to the CLI. Sections and class configurations (``class_path`` / ``init_args``) merge recursively, as
    jsonargparse merges them, and so do typed argument groups (an ``__init__`` argument annotated with a
    dataclass, e.g. ``model.init_args.loss``); the value of any other argument is replaced whole, a dictionary too
    (a later ``task_kwargs: {styles: ...}`` drops the earlier ``task_kwargs``, as the CLI does), and so are lists
    and scalars.
    """
    from pathlib import Path

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
    for path in paths:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping, got {type(loaded).__name__}")
        cfg = merge(cfg, loaded)
    return cfg


def _typed_groups(class_path: str | None) -> set[str]:
    """The ``__init__`` arguments of ``class_path`` annotated with a dataclass (empty when it does not import)."""
    import dataclasses
    import importlib
    import typing

    module, _, name = str(class_path or "").rpartition(".")
    try:
        hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    except Exception:  # noqa: BLE001 - a class we cannot inspect has no groups we know of
        return set()
    return {k for k, v in hints.items() if dataclasses.is_dataclass(v)}
