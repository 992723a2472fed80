"""Helpers for policies whose parameters are sharded across ranks (FSDP1 wrappers or FSDP2/DTensor parameters).

Three places need the whole model while training shards it: the weight sync into the rollout generator (a full
copy of every tensor), gradient clipping (the norm over all shards, not the local one), and building the native
engine (it cannot deep-copy a sharded module). Unsharded modules pass straight through, so DDP and single-device
runs take the plain paths.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def is_sharded(root: nn.Module) -> bool:
    """True when ``root`` holds FSDP1-wrapped submodules or DTensor (FSDP2 / tensor-parallel) parameters."""
    return any(_is_fsdp1(m) for m in root.modules()) or any(_is_dtensor(p) for p in root.parameters())


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``root``'s submodule at ``prefix`` (names relative to it), on every rank.

    ``root`` must be the outermost module the strategy wrapped (``trainer.strategy.model``): FSDP1 only gathers
    through its root, so asking a submodule directly would return local shards. For a sharded root this is a
    collective: every rank must call it. Wrapper segments in names (``_fsdp_wrapped_module.``,
    ``_checkpoint_wrapped_module.``) are removed by torch's state-dict API, so names match the unwrapped module.

    Args:
        root: the strategy's model (or any unsharded module).
        prefix: dotted path of the wanted submodule inside ``root`` (e.g. ``"policy.model."``); ``""`` keeps all.

    Returns:
        name → full tensor (on the parameters' device; detached).
    """
    if is_sharded(root):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        state = root.state_dict()
    out = {}
    for name, tensor in state.items():
        if prefix and not name.startswith(prefix):
            continue
        out[name[len(prefix):]] = tensor.detach()
    if prefix and not out:
        raise KeyError(f"full_state_dict: no entries under prefix {prefix!r} (first keys: {list(state)[:3]})")
    return out


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip ``module``'s gradients to a global L2 norm of ``max_norm``; returns the norm before clipping.

    An FSDP1 module keeps only a shard of each flat gradient per rank, so the norm must come from its own
    ``clip_grad_norm_`` (it all-reduces the squared shard norms); DTensor gradients (FSDP2) and plain tensors are
    handled by ``torch.nn.utils.clip_grad_norm_``, whose result is made a plain tensor here.
    """
    if _is_fsdp1(module):
        return module.clip_grad_norm_(max_norm)
    norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], max_norm)
    return norm.full_tensor() if _is_dtensor(norm) else norm


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside an FSDP1 wrapper (itself otherwise)."""
    return module.module if _is_fsdp1(module) else module


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which an FSDP1 module holds its full parameters on every rank (read-only); no-op otherwise.

    Inference code (the rollout engine, Pareto evaluation) calls submodules directly rather than through the
    wrapper's ``forward``, so the parameters must be gathered around it. A collective: every rank must enter.
    """
    if _is_fsdp1(module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(module, writeback=False, recurse=True)
    return contextlib.nullcontext()


def wrap_fsdp(module: nn.Module, layer_classes: set[type[nn.Module]], *, device: torch.device,
              **fsdp_kwargs) -> nn.Module:
    """Shard ``module`` with FSDP1: each ``layer_classes`` instance its own unit, the rest in the outer unit.

    Training must then call the returned wrapper (its ``forward``), so the outer unit's parameters (embeddings,
    final norm, output layer) are gathered around every forward and backward.

    Args:
        module: e.g. a `BlockDiffusionLM` (whose ``forward`` is the training forward).
        layer_classes: decoder-layer classes that become separate units.
        device: the rank's device (CPU for gloo tests).
        fsdp_kwargs: passed to ``FullyShardedDataParallel`` (sharding_strategy, mixed_precision, cpu_offload…).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    fsdp_kwargs = {k: v for k, v in fsdp_kwargs.items() if v is not None}
    fsdp_kwargs.setdefault("use_orig_params", True)
    return FullyShardedDataParallel(
        module, auto_wrap_policy=ModuleWrapPolicy(layer_classes), device_id=device, **fsdp_kwargs
    )


# wrapper segments that torch's state-dict APIs drop from parameter names
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def submodule_prefix(root: nn.Module, target: nn.Module) -> str:
    """The state-dict prefix (``"policy.model."``) of ``target`` inside ``root``, wrapper segments removed.

    Raises:
        ValueError: ``target`` is not a submodule of ``root``.
    """
    if target is root:
        return ""
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
            return ".".join(parts) + "." if parts else ""
    raise ValueError(f"submodule_prefix: {type(target).__name__} is not inside {type(root).__name__}")


def cast_copy(lm: nn.Module, dtype: torch.dtype, source=None) -> nn.Module:
    """A frozen copy of a `BlockDiffusionLM` in ``dtype`` on its device, built without a full-precision copy: the
    network is created on the meta device, materialised empty in ``dtype`` and filled tensor by tensor (buffers
    included, e.g. RoPE's non-persistent ``inv_freq``), so the extra memory is the ``dtype`` copy alone.
    ``source``: a mapping of plain names to tensors read one at a time instead of ``lm.model``'s own (LoRA's
    `lrl.models.lora.MergedWeights`)."""
    import copy

    hf = lm.model
    with torch.device("meta"):
        skeleton = type(hf)._from_config(hf.config, dtype=dtype)
    skeleton.to_empty(device=lm.device)
    if getattr(hf.config, "tie_word_embeddings", False):
        skeleton.tie_weights()  # to_empty replaces each module's parameters: the tied head became its own tensor
    with torch.no_grad():
        if source is not None:
            src = source
        else:
            src = dict(hf.named_parameters(remove_duplicate=False))
            src.update(dict(hf.named_buffers()))
        for name, t in [*skeleton.named_parameters(), *skeleton.named_buffers()]:
            t.copy_(src[name])
    planner = copy.deepcopy(lm.planner).to(dtype) if getattr(lm, "planner", None) is not None else None
    out = type(lm)(skeleton, lm.bd, identity=lm.identity, attention=lm.attention,
                   decode_attention=lm.decode_attention, planner=planner)
    return out.eval().requires_grad_(False)
