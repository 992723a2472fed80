"""The model's shape for the memory plan, without weights: config.json (or a known SDAR shape) and a meta-device build.

Parameter counts come from building the transformers model on the ``meta`` device (no memory, no weights), so they
are exact for the architecture the trainer will load (tied embeddings, QK-norm weights, biases included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Shapes of public checkpoints whose weights are not on this machine (spec §1.1; SDAR-1.7B is Qwen3-1.7B's shape).
KNOWN_SHAPES: dict[str, dict] = {
    "sdar-8b": {"model_type": "sdar", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                "tie_word_embeddings": False, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
    "sdar-4b": {"model_type": "sdar", "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
                "tie_word_embeddings": True, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
    "sdar-1.7b": {"model_type": "sdar", "hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936,
                  "tie_word_embeddings": True, "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of the architecture. Counts are parameters (elements), not bytes.

    Args:
        name: where the shape came from (a config.json path or a known shape's name).
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the decoder's dimensions.
        params: all parameters; layer_params: one decoder layer's; root_params: the rest (embeddings, output
            layer, final norm: FSDP's outer unit).
        largest_param: the largest single parameter (its gradient is one transient of the backward).
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int
    layer_params: int
    root_params: int
    largest_param: int

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per token per element byte: 2 (K and V) × layers × kv_heads × head_dim."""
        return 2 * self.layers * self.kv_heads * self.head_dim


def _config_for(checkpoint: str | None, model_config: str | None) -> tuple[str, dict]:
    if model_config:
        return model_config, json.loads(Path(model_config).read_text())
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        path = Path(checkpoint) / "config.json"
        return str(path), json.loads(path.read_text())
    name = Path(str(checkpoint or "")).name.lower()
    for key in sorted(KNOWN_SHAPES, key=len, reverse=True):
        if key in name:
            return key, dict(KNOWN_SHAPES[key])
    raise FileNotFoundError(
        f"plan: no config.json in checkpoint {checkpoint!r} and its name matches no known shape "
        f"({', '.join(KNOWN_SHAPES)}); give --model_config path/to/config.json"
    )


def load_shape(checkpoint: str | None = None, model_config: str | None = None) -> ModelShape:
    """The shape of the checkpoint's model: its config.json, else ``model_config``, else a known shape whose name
    is in the checkpoint's directory name (e.g. ``SDAR-8B-Chat-b32`` → ``sdar-8b``)."""
    from lrl.models.loading import FAMILIES, IDENTITY_KEYS, _family_classes

    name, raw = _config_for(checkpoint, model_config)
    family = FAMILIES.get(str(raw.get("model_type", "")).lower())
    if family is None:
        raise ValueError(f"plan: model_type {raw.get('model_type')!r} of {name} is not supported")
    config_cls, model_cls = _family_classes(family)
    body = {k: v for k, v in raw.items() if k not in (*IDENTITY_KEYS, "transformers_version", "planner")}
    cfg = config_cls(**body)
    with torch.device("meta"):
        model = model_cls(cfg)
    params = sum(p.numel() for p in model.parameters())  # tied weights count once
    layers = model.model.layers
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelShape(
        name=name,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        params=params,
        layer_params=layer_params,
        root_params=params - sum(p.numel() for layer in layers for p in layer.parameters()),
        largest_param=max(p.numel() for p in model.parameters()),
    )
