"""LoRA adapters on the policy with PEFT (issue 28 item 6): settings, application, the base view and merged weights.

The policy's transformers model is adapted in place by ``peft.get_peft_model``: its targeted ``nn.Linear`` layers
become ``peft`` LoRA layers (``q_proj.base_layer.weight`` + ``q_proj.lora_A/B.default.weight``) and every other
parameter is frozen. ``BlockDiffusionLM.model`` stays that transformers model, so every forward (training, the
native engine, the Pareto sweep) runs with the adapters applied; the `peft.PeftModel` around it is kept beside
the policy (not a submodule, so it adds nothing to ``state_dict``) for its ``disable_adapter()`` context, in which
the same model is the frozen base: the KL reference with no second model.

Three views of the weights:

* live: the policy itself (adapters applied on the fly); the native engine decodes it directly;
* base: the policy inside `adapters_disabled` (the reference);
* merged: `MergedWeights`, a mapping of plain HF names (``…q_proj.weight``) whose LoRA entries are computed one
  tensor at a time as W + (alpha / rank)·B·A (``peft``'s ``get_delta_weight``) without touching the live
  policy: what an engine-owned copy, a rollout server or a Pareto checkpoint receives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
KEY = "model.init_args.lora"


@dataclass
class LoraSettings:
    """LoRA adapters on the policy (PEFT). The base weights are frozen and held in the trainer's compute dtype
    (bf16 under ``bf16-mixed``); only the adapters (float32), their gradients and AdamW states are trained and
    checkpointed. The KL reference is the base (adapters disabled): no second model.

    Args:
        rank: r, the rank of each adapter (B is out × r, A is r × in).
        alpha: scaling numerator: a layer computes W·x + (alpha / rank)·B·A·x.
        dropout: dropout on the adapters' input while training (0: none, and no extra activation memory).
        target_modules: names of the linear layers to adapt (matched against the end of each module's name, as
            peft's ``target_modules``); the default is every attention and MLP projection of a Qwen3 layer.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


def lora_settings(value: LoraSettings | Mapping | None) -> LoraSettings | None:
    """``model.init_args.lora`` as `LoraSettings` (a dict from Python or a saved checkpoint is accepted), range
    checked; errors are one line naming ``model.init_args.lora.<key>``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(LoraSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{KEY}.{unknown[0]} is not a LoRA setting (known: rank, alpha, dropout, "
                             "target_modules)")
        value = LoraSettings(**value)
    if not isinstance(value, LoraSettings):
        raise ValueError(f"{KEY} must be a mapping of rank, alpha, dropout, target_modules (or null: off), "
                         f"got {type(value).__name__}")
    if isinstance(value.rank, bool) or not isinstance(value.rank, int) or value.rank < 1:
        raise ValueError(f"{KEY}.rank must be an int >= 1, got {value.rank!r}")
    if isinstance(value.alpha, bool) or not isinstance(value.alpha, int | float) or not value.alpha > 0:
        raise ValueError(f"{KEY}.alpha must be a number > 0, got {value.alpha!r}")
    if isinstance(value.dropout, bool) or not isinstance(value.dropout, int | float) or not 0 <= value.dropout < 1:
        raise ValueError(f"{KEY}.dropout must be in [0, 1), got {value.dropout!r}")
    targets = value.target_modules
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"{KEY}.target_modules must be a non-empty list of module names, got {targets!r}")
    return LoraSettings(int(value.rank), float(value.alpha), float(value.dropout), list(targets))


def apply_lora(lm: nn.Module, settings: LoraSettings, base_dtype: torch.dtype | None = None) -> None:
    """Adapt ``lm.model`` (a `BlockDiffusionLM`'s transformers model) in place with LoRA.

    The base is cast to ``base_dtype`` first (None: kept), the adapters are created in float32 (peft's
    ``autocast_adapter_dtype``) and the base is frozen. A planner head (``lm.planner``) is outside the adapted
    model and stays trainable. Under gradient checkpointing the input embeddings' output is made to require
    grad, so the checkpointed layers' adapters get gradients although the embeddings are frozen.

    Raises:
        ValueError: a target module name matches no linear layer (one line naming the key).
    """
    from peft import LoraConfig, get_peft_model

    hf = lm.model
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in hf.named_modules() if isinstance(m, nn.Linear)})
    for target in settings.target_modules:
        if not any(name == target or name.endswith("." + target) for name, m in hf.named_modules()
                   if isinstance(m, nn.Linear)):
            raise ValueError(f"{KEY}.target_modules: {target!r} matches no linear layer of "
                             f"{type(hf).__name__} (its linear layers: {', '.join(linear)})")
    if base_dtype is not None:
        hf.to(base_dtype)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    peft_model = get_peft_model(hf, config, autocast_adapter_dtype=True)
    assert peft_model.base_model.model is hf  # adapted in place: the policy keeps its own model object
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers >= 4.57's name
    if checkpointing is None:
        checkpointing = getattr(hf, "is_gradient_checkpointing", False)
    if checkpointing:
        hf.enable_input_require_grads()
    lm._lora = [peft_model]  # a list: not a submodule (no second set of state_dict names)
    lm._lora_settings = settings


def lora_model(lm: nn.Module):
    """The `peft.PeftModel` around ``lm.model`` (None when ``lm`` has no adapters)."""
    return (getattr(lm, "_lora", None) or [None])[0]


def adapters_disabled(lm: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which ``lm`` computes with its base weights only (peft's ``disable_adapter``); a no-op
    without adapters."""
    peft_model = lora_model(lm)
    return peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()


def _is_adapter_key(key: str) -> bool:
    return any(part in _ADAPTER_PARTS for part in key.split("."))


class MergedWeights(Mapping):
    """The adapted model's weights as a plain model would name and hold them, computed on access.

    Keys are ``hf``'s state-dict names with ``.base_layer`` removed and the adapters' own tensors left out
    (``buffers=True`` adds every buffer, non-persistent ones included, as `cast_copy` needs). The value of an
    adapted layer's ``weight`` is W + ΔW (peft's ``get_delta_weight`` of the active adapter, i.e.
    (alpha / rank)·B·A), added in float32 and returned in ``dtype`` (default W's); other values are the tensors
    themselves (detached); with ``device`` each value is moved there as it is computed. Nothing in ``hf`` is
    modified, and only one merged tensor exists at a time on the model's device when the mapping is iterated.
    """

    def __init__(self, hf: nn.Module, *, buffers: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        from peft.tuners.lora import LoraLayer

        self._layers = {name: m for name, m in hf.named_modules() if isinstance(m, LoraLayer)}
        src = dict(hf.state_dict(keep_vars=True))
        if buffers:
            src.update(dict(hf.named_buffers()))
        self._src = {key.replace(".base_layer.", "."): t for key, t in src.items() if not _is_adapter_key(key)}
        self._dtype = dtype
        self._device = device

    def __len__(self) -> int:
        return len(self._src)

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._src[name].detach()
        module, _, leaf = name.rpartition(".")
        layer = self._layers.get(module)
        if layer is not None and leaf == "weight":
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            t = (t.float() + delta.to(t.device, torch.float32)).to(t.dtype)
        if self._dtype is not None and t.is_floating_point():
            t = t.to(self._dtype)
        return t.to(self._device) if self._device is not None else t


def merge_lora(lm: nn.Module) -> None:
    """Fold the adapters into ``lm.model``'s weights (peft's ``merge_and_unload``): ``lm`` becomes a plain model
    (exports). No-op without adapters."""
    peft_model = lora_model(lm)
    if peft_model is None:
        return
    lm.model = peft_model.merge_and_unload()
    del lm._lora, lm._lora_settings


def settings_dict(lm: nn.Module) -> dict | None:
    settings = getattr(lm, "_lora_settings", None)
    return asdict(settings) if settings is not None else None
