"""Load and save block-diffusion checkpoints (HF directories: config.json + safetensors + tokenizer files), offline.

SDAR checkpoints are Qwen3 weights whose config.json says ``model_type: sdar`` and ``architectures:
["SDARForCausalLM"]`` (plus ``auto_map`` to their own modeling file). We never execute remote code: the config is
mapped onto the matching transformers class (Qwen3 for SDAR, Qwen2 for Fast-dLLM-v2), and the keys that make the
checkpoint a diffusion model for other tools are kept as the model's *identity* and written back on save, because
SGLang decides from ``architectures`` whether to serve a checkpoint as a diffusion LM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import torch

from lrl.atomic import atomic_dir_write
from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.config import resolve_block_diffusion_config
from lrl.models.planner import PLANNER_CONFIG_KEY, load_planner, save_planner

# model_type (lower-case) → transformers family used to build the network.
FAMILIES = {
    "sdar": "qwen3",
    "qwen3": "qwen3",
    "trado": "qwen3",
    "qwen2": "qwen2",
    "fast_dllm_v2": "qwen2",
    "fast_dllm_qwen": "qwen2",
    "sdar_moe": "qwen3_moe",
    "qwen3_moe": "qwen3_moe",
}
# Keys preserved verbatim from the original config.json and restored on save.
IDENTITY_KEYS = ("model_type", "architectures", "auto_map", "block_size", "mask_token_id", "logit_shift")


def _family_classes(family: str):
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3Config, Qwen3ForCausalLM
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        return Qwen3MoeConfig, Qwen3MoeForCausalLM
    raise ValueError(f"unknown model family {family!r}")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' per-shard progress bars and the expected 'model of type sdar' warning."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_config(path: str | os.PathLike) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: {cfg_file} does not exist")
    return json.loads(cfg_file.read_text())


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer. Loaded once per process and directory version, then shared (read-only): a
    151k-token BPE takes seconds to load, and the datamodule, the module and the engines all ask for it."""
    path = Path(path).resolve()
    files = sorted(f for f in path.glob("*") if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                                     "chat_template", "added_tokens")))
    return _load_tokenizer(str(path), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, _version: tuple):
    from transformers import AutoTokenizer

    with _quiet_transformers():  # AutoTokenizer reads config.json and warns about the unknown model_type "sdar"
        # trust_remote_code=False: an SDAR config.json's auto_map would otherwise make transformers ask on stdin
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    mask_token_id: int | None = None,
    block_size: int | None = None,
    logit_shift: bool | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attention: str = "sdpa",
    load_tokenizer_files: bool = True,
):
    """Load ``(BlockDiffusionLM, tokenizer)`` from a local HF checkpoint directory without network access.

    Args:
        path: directory with config.json, *.safetensors and tokenizer files.
        mask_token_id, block_size, logit_shift: explicit overrides of the checkpoint's values.
        dtype: parameter dtype (default: float32 on CPU, the checkpoint's ``torch_dtype`` elsewhere).
        device: where to put the model.
        attention: ``"sdpa"`` or ``"flex"`` (see `BlockDiffusionLM`).
    """
    raw = read_config(path)
    hf_config, model_cls = _hf_config(raw, path)
    identity = {k: raw[k] for k in IDENTITY_KEYS if k in raw}
    tokenizer = load_tokenizer(path) if load_tokenizer_files else None
    bd = resolve_block_diffusion_config(
        raw, tokenizer, mask_token_id=mask_token_id, block_size=block_size, logit_shift=logit_shift
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float32 if device is None or str(device) == "cpu" else getattr(hf_config, "torch_dtype", None)
    with _quiet_transformers():
        model = model_cls.from_pretrained(
            str(path), config=hf_config, dtype=dtype or torch.float32, local_files_only=True, attn_implementation="sdpa"
        )
    if device is not None:
        model = model.to(device)
    planner = load_planner(path, raw, device=device)  # None when the checkpoint has no planner head
    return BlockDiffusionLM(model, bd, identity=identity, attention=attention, planner=planner), tokenizer


def _hf_config(raw: dict, path) -> tuple[object, type]:
    """(transformers config, model class) of a raw config.json."""
    model_type = str(raw.get("model_type", "")).lower()
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not supported; known: {sorted(FAMILIES)}")
    config_cls, model_cls = _family_classes(family)
    body = {
        k: v for k, v in raw.items()
        if k not in ("model_type", "architectures", "auto_map", "transformers_version", PLANNER_CONFIG_KEY)
    }
    try:
        return config_cls(**body), model_cls
    except Exception as exc:  # noqa: BLE001 - transformers' validators raise their own types; it is bad input
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"{path}: config.json does not describe a valid {family} model ({lines[-1] if lines else exc})"
                         ) from None


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older exports wrote; transformers recomputes them


def expected_weights(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """``({HF name: shape}, names that may be absent)`` of the network config.json describes (built on the meta
    device: no memory, no weights read). Tied output embeddings may be absent from the files."""
    raw = read_config(path)
    hf_config, model_cls = _hf_config(raw, path)
    with _quiet_transformers(), torch.device("meta"):
        model = model_cls(hf_config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    return shapes, optional


def check_weights(path: str | os.PathLike, files: list[Path], key: str = "checkpoint", values: bool = True) -> None:
    """Refuse, naming ``key``, safetensors ``files`` that do not hold exactly the network config.json describes:
    a missing or extra tensor, a shape that differs from the config's (e.g. ``vocab_size`` / ``hidden_size`` not
    matching the weights), a non-float tensor, and with ``values`` a NaN or infinite weight (transformers would
    otherwise initialise missing weights at random, skip extra ones and load NaNs silently). Headers are read
    first; values are read tensor by tensor (memory-mapped), once the names and shapes agree."""
    from safetensors import safe_open

    expected, optional = expected_weights(path)
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and not name.endswith(_IGNORED_SUFFIXES):
                found[name] = (tuple(meta["shape"]), str(meta["dtype"]), f)
    missing = sorted(set(expected) - set(found) - optional)
    extra = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{key}: {path} lacks {len(missing)} weight(s) of the model its config.json describes, "
                         f"e.g. {missing[:3]} (a different architecture, or an incomplete export)")
    if extra:
        raise ValueError(f"{key}: {path} holds {len(extra)} weight(s) its config.json's model does not have, e.g. "
                         f"{extra[:3]} (config.json from another model?)")
    for name, (shape, dtype, f) in found.items():
        if shape != expected[name]:
            raise ValueError(f"{key}: {path}: weight {name} has shape {list(shape)} but config.json describes "
                             f"{list(expected[name])} (vocab_size / hidden_size / layer sizes do not match the "
                             "weights)")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{key}: {path}: weight {name} is {dtype}, not a floating-point tensor")
    if not values:
        return
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{key}: {path}: weight {name} holds NaN or infinite values")


def save_checkpoint(lm: BlockDiffusionLM, path: str | os.PathLike, tokenizer=None, state_dict=None) -> None:
    """Save an HF directory that keeps the block-diffusion identity (model_type, architectures, auto_map, …).

    ``state_dict`` lets a caller save weights other than ``lm``'s current ones (e.g. gathered FSDP weights); it
    holds the backbone's (HF) names only. A planner head (``lm.planner``) goes to its own file, see
    `lrl.models.planner`.
    """

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            lm.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.update(lm.identity)
        cfg["block_size"] = lm.bd.block_size
        cfg["mask_token_id"] = lm.bd.mask_token_id
        if lm.bd.logit_shift or "logit_shift" in lm.identity:
            cfg["logit_shift"] = lm.bd.logit_shift
        cfg.pop(PLANNER_CONFIG_KEY, None)
        if getattr(lm, "planner", None) is not None:
            cfg[PLANNER_CONFIG_KEY] = save_planner(lm.planner, tmp)
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    atomic_dir_write(Path(path), write)
