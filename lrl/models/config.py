"""Block-diffusion settings with one source of truth (spec §1.1).

`BlockDiffusionConfig` holds what turns a decoder into a block-diffusion LM: the mask token, the block size and
whether logits are shifted. Values come from the checkpoint config and the tokenizer and may be overridden
explicitly; any disagreement is an error that names both sources, because a split mask id (rollout 151669,
training something else) silently ruins training (style-and-ecosystem §B2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# SDAR's modeling code falls back to block 4 when config.json has no block_size (spec §1.1).
SDAR_DEFAULT_BLOCK_SIZE = 4
# SDAR's mask token: its tokenizers list it as an added token but need not declare it as ``mask_token``.
SDAR_MASK_TOKEN = "<|MASK|>"
# model_type → whether position i predicts token i+1 (AR-adapted diffusion, e.g. Fast-dLLM-v2).
SHIFTED_MODEL_TYPES = {"fast_dllm_v2", "fast_dllm_qwen", "fast_dllm"}


@dataclass(frozen=True)
class BlockDiffusionConfig:
    """What the rollout engine and the trainer share about the diffusion process.

    Args:
        mask_token_id: Id of the ``[MASK]`` token that noisy positions are set to.
        block_size: Tokens per block of the model's block-causal attention.
        logit_shift: False for SDAR (position i predicts token i); True for AR-adapted models (position i − 1
            predicts token i).
    """

    mask_token_id: int
    block_size: int
    logit_shift: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"BlockDiffusionConfig.block_size must be > 0, got {self.block_size}")
        if self.mask_token_id < 0:
            raise ValueError(f"BlockDiffusionConfig.mask_token_id must be >= 0, got {self.mask_token_id}")


def tokenizer_mask_id(tokenizer: Any | None) -> int | None:
    """The tokenizer's mask id: its declared ``mask_token``, else SDAR's ``<|MASK|>`` if it is in the vocabulary."""
    if tokenizer is None:
        return None
    declared = getattr(tokenizer, "mask_token_id", None)
    if declared is not None:
        return int(declared)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return int(vocab[SDAR_MASK_TOKEN]) if SDAR_MASK_TOKEN in vocab else None


def resolve_block_diffusion_config(
    model_config: Any,
    tokenizer: Any | None = None,
    *,
    mask_token_id: int | None = None,
    block_size: int | None = None,
    logit_shift: bool | None = None,
) -> BlockDiffusionConfig:
    """Combine explicit overrides, the checkpoint config and the tokenizer into one `BlockDiffusionConfig`.

    Precedence: explicit argument > checkpoint config > tokenizer (mask id: its ``mask_token``, else a
    ``<|MASK|>`` token) > SDAR fallback (block size 4).
    Errors: no mask token anywhere; tokenizer and config disagree on the mask id; the mask id is outside the
    embedding table or unknown to the tokenizer.
    """
    get = (
        (lambda k: model_config.get(k))
        if isinstance(model_config, dict)
        else (lambda k: getattr(model_config, k, None))
    )
    cfg_mask = get("mask_token_id")
    tok_mask = tokenizer_mask_id(tokenizer)
    if cfg_mask is not None and tok_mask is not None and int(cfg_mask) != int(tok_mask) and mask_token_id is None:
        raise ValueError(
            f"mask token mismatch: checkpoint config.json has mask_token_id={cfg_mask} but the tokenizer's mask token "
            f"{getattr(tokenizer, 'mask_token', None) or SDAR_MASK_TOKEN!r} has id {tok_mask}; fix one of them"
        )
    mask = mask_token_id if mask_token_id is not None else (cfg_mask if cfg_mask is not None else tok_mask)
    if mask is None:
        raise ValueError(
            "no mask token: the checkpoint config has no mask_token_id and the tokenizer defines no mask token "
            "(add e.g. '<|MASK|>' as the tokenizer's mask_token, or set mask_token_id in config.json)"
        )
    mask = int(mask)
    if tok_mask is not None and mask != int(tok_mask):
        raise ValueError(
            f"mask token mismatch: mask_token_id={mask} was requested but the tokenizer's mask token "
            f"{getattr(tokenizer, 'mask_token', None) or SDAR_MASK_TOKEN!r} has id {tok_mask}"
        )
    vocab = get("vocab_size")
    if vocab is not None and mask >= int(vocab):
        raise ValueError(f"mask_token_id={mask} is outside the model's vocabulary (vocab_size={vocab})")
    if tokenizer is not None and mask >= len(tokenizer):
        raise ValueError(f"mask_token_id={mask} is not a token of the tokenizer ({len(tokenizer)} tokens)")
    bs = block_size if block_size is not None else get("block_size")
    bs = int(bs) if bs is not None else SDAR_DEFAULT_BLOCK_SIZE
    if logit_shift is None:
        logit_shift = get("logit_shift")
        if logit_shift is None:
            logit_shift = str(get("model_type") or "").lower() in SHIFTED_MODEL_TYPES
    return BlockDiffusionConfig(mask_token_id=mask, block_size=bs, logit_shift=bool(logit_shift))
