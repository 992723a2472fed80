"""Tiny block-diffusion models for tests and the demo: a Qwen3-shaped network and a character tokenizer.

Nothing is downloaded: the tokenizer is built with the `tokenizers` library from a character set, the model is
randomly initialised from a config, and both are saved as an ordinary HF checkpoint directory with SDAR's
identity (``model_type: sdar``, ``architectures: ["SDARForCausalLM"]``), so the real loading path is exercised.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.config import BlockDiffusionConfig
from lrl.models.loading import save_checkpoint

DEFAULT_CHARS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
EOS, PAD, MASK, UNK = "<|endoftext|>", "<|pad|>", "<|MASK|>", "<|unk|>"
SDAR_IDENTITY = {"model_type": "sdar", "architectures": ["SDARForCausalLM"]}


def build_char_tokenizer(chars: str = DEFAULT_CHARS):
    """A `PreTrainedTokenizerFast` with one token per character plus eos, pad, mask and unk (chat-free)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, PAD, MASK, UNK]
    uniq = sorted(set(chars))
    vocab = {tok: i for i, tok in enumerate(specials + uniq)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        unk_token=UNK,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_tiny_model(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    block_size: int = 4,
    logit_shift: bool = False,
    seed: int = 0,
) -> BlockDiffusionLM:
    """A randomly initialised Qwen3 (QK-norm, GQA, SwiGLU, untied head) wrapped as a block-diffusion LM."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = len(tokenizer)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    bd = BlockDiffusionConfig(mask_token_id=tokenizer.mask_token_id, block_size=block_size, logit_shift=logit_shift)
    return BlockDiffusionLM(model.float(), bd, identity=dict(SDAR_IDENTITY))


def build_tiny_checkpoint(path: str | os.PathLike, chars: str = DEFAULT_CHARS, **model_kwargs) -> Path:
    """Build and save a tiny model + tokenizer as an HF checkpoint directory; returns the path."""
    tokenizer = build_char_tokenizer(chars)
    lm = build_tiny_model(tokenizer, **model_kwargs)
    save_checkpoint(lm, path, tokenizer=tokenizer)
    return Path(path)
