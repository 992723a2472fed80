"""Where dataset rows come from: a Hugging Face dataset or a local ``.jsonl``/``.json``/``.parquet`` file (§6.1).

A ``source`` is either a hub name (``"openai/gsm8k"``, loaded with ``datasets.load_dataset(name, config,
split=...)``) or a local path. A local path may contain ``{split}``, replaced by the dataset split name, so that
one setting covers ``data/gsm8k_train.jsonl`` and ``data/gsm8k_test.jsonl``; without it every split reads the same
file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Local file suffix → `datasets` packaged builder.
_LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}

DEFAULT_SPLITS: dict[str, str] = {"train": "train", "eval": "test", "test": "test"}


def local_builder(source: str) -> str | None:
    """The ``datasets`` builder for a local file path, or ``None`` when ``source`` names a hub dataset."""
    lowered = source.lower()
    for suffix, builder in _LOCAL_BUILDERS.items():
        if lowered.endswith(suffix):
            return builder
    return None


def resolve_split(splits: Mapping[str, str], split: str, task: str) -> str:
    """Map our split name (``train``/``eval``/``test``) to the dataset's split name."""
    if split not in splits:
        raise ValueError(f"{task}: unknown split {split!r}; this task defines {sorted(splits)}")
    return splits[split]


def load_rows(
    source: str,
    split: str,
    *,
    config: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of one split as plain dicts.

    Args:
        source: Hub dataset name, or a local ``.jsonl``/``.json``/``.parquet`` path (optionally with ``{split}``).
        split: Dataset split name (already mapped by :func:`resolve_split`).
        config: Hub configuration name (e.g. ``"main"`` for GSM8K); ignored for local files.
        cache_dir: ``datasets`` cache directory (default: the HF cache).
        limit: Keep only the first ``limit`` rows.

    Returns:
        The rows, in file order.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    import datasets  # lazy: heavy import, only needed when a dataset is actually read

    builder = local_builder(source)
    if builder is not None:
        path = Path(source.replace("{split}", split)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path} (from source {source!r}, split {split!r})")
        if path.suffix == ".jsonl":
            _check_jsonl(path)
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as exc:  # noqa: BLE001 - datasets wraps parse errors in its own types; name the file
            cause = exc.__cause__ or exc
            raise ValueError(f"{path}: cannot be read as {builder} ({type(cause).__name__}: {cause})") from exc
    else:
        dataset = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [dict(row) for row in dataset]


def _check_jsonl(path: Path) -> None:
    """Name the file and line of the first line that is not a JSON object (datasets reports it deep in pyarrow)."""
    import json

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object")


def load_task_records(task, split: str) -> list[dict]:
    """Rows of a dataset-backed task's ``split`` turned into records by ``task.to_record`` (shared by the math and
    code dataset tasks: ``source``, ``splits``, ``config``, ``cache_dir``, ``limit`` are their fields)."""
    if not task.source:
        raise ValueError(f"{task.name}: no source set (a hub dataset name or a local .jsonl/.json/.parquet)")
    rows = load_rows(
        task.source,
        resolve_split(task.splits, split, task.name),
        config=task.config,
        cache_dir=task.cache_dir,
        limit=task.limit,
    )
    where = task.source.replace("{split}", split) if local_builder(task.source) else f"{task.source} [{split}]"
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(task.to_record(row, i))
        except (ValueError, KeyError, TypeError) as exc:  # name the file as well as the record and field
            raise ValueError(f"{where}: {exc}") from exc
    return records
