"""What a checkpoint says about generation: its stop tokens and whether it brings a chat template.

Chat checkpoints stop on more than the tokenizer's eos: SDAR/Qwen3 list ``<|im_end|>`` and ``<|endoftext|>`` in
``generation_config.json`` (spec §2.4: stop ids = tokenizer eos + generation_config eos), while config.json's
``eos_token_id`` is ``<|endoftext|>`` only. Rollouts, evaluation and serving read the same set from here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def checkpoint_stop_ids(
    path: str | os.PathLike | None, tokenizer: Any, override=None, *, hf_config: Any = None
) -> tuple[int, ...]:
    """Stop token ids for generating with the checkpoint at ``path``, sorted.

    ``override`` (a non-empty list) wins. Otherwise: the eos ids of ``generation_config.json`` (or, without that
    file, of ``config.json``; without a path, of ``hf_config``) plus the tokenizer's eos token.
    """
    if override:
        return tuple(sorted({int(t) for t in override}))
    ids: set[int] = set()
    files = [Path(path) / n for n in ("generation_config.json", "config.json")] if path else []
    found = next((f for f in files if f.is_file()), None)
    if found is not None:
        ids.update(_ids(json.loads(found.read_text()).get("eos_token_id")))
    elif hf_config is not None:
        ids.update(_ids(getattr(hf_config, "eos_token_id", None)))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"{path}: no stop token (no eos_token_id in generation_config.json / config.json and the "
                         "tokenizer has no eos token); set data.stop_token_ids")
    return tuple(sorted(ids))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings its own chat template (``tokenizer_config.json`` / ``chat_template.jinja``)."""
    return bool(getattr(tokenizer, "chat_template", None))
