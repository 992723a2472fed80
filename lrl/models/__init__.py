"""Model layer: block-diffusion LMs on top of transformers decoders."""

from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.config import BlockDiffusionConfig, resolve_block_diffusion_config
from lrl.models.kv_cache import BlockKVCache
from lrl.models.loading import load_checkpoint, load_tokenizer, save_checkpoint
from lrl.models.tiny import build_char_tokenizer, build_tiny_checkpoint, build_tiny_model

__all__ = [
    "BlockDiffusionConfig",
    "BlockDiffusionLM",
    "BlockKVCache",
    "build_char_tokenizer",
    "build_tiny_checkpoint",
    "build_tiny_model",
    "load_checkpoint",
    "load_tokenizer",
    "resolve_block_diffusion_config",
    "save_checkpoint",
]
