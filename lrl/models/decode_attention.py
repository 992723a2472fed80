"""Mask-free attention for the engine's one-block forwards (spec §2.1): a key length per row, no dense mask.

A denoising or store forward runs one block of T = block_size tokens at block-aligned slots [s_r, s_r + T) of row
r. Under the block-causal rule every query of that block sees the same keys: the committed cache [0, s_r) plus
the first n_r slots of its own block (n_r: the in-budget prefix). So one length per row, s_r + n_r, replaces the
(A, 1, T, S) boolean mask that keeps SDPA off its flash kernel. The one difference from the dense mask: a query
past the budget does not also see itself; its output is never used (nothing is sampled there, nothing committed).

Kernels, picked per forward:
* every row reads all S keys (batch 1, or rows at the same position and in budget): SDPA with no mask at all, so
  CUDA runs flash attention;
* lengths differ and ``kernel="flex"``: flex_attention with a BlockMask built from the lengths (key tiles past a
  row's end are skipped; compiled on CUDA);
* lengths differ otherwise: SDPA with an (A, 1, 1, S) key-padding mask, broadcast over heads and queries.
Prefill (several blocks at once) is block-causal inside the chunk and keeps the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention as _sdpa

LENGTHS_IMPL = "lrl_kv_lengths"
KERNELS = ("dense", "lengths", "flex", "auto")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel a forward on ``device`` uses: ``auto`` is ``lengths`` on CUDA and ``dense`` elsewhere (the CPU
    path keeps the mask it was validated with)."""
    if kernel == "auto":
        return "lengths" if device.type == "cuda" else "dense"
    return kernel


@dataclass
class KVLengths:
    """The attention mask of a one-block forward: per-row key lengths, passed to every layer in place of a mask.

    Args:
        lengths: (A,) keys each row attends to (a prefix of the S keys the cache returns).
        uniform: every length equals S (no mask needed).
        kernel: ``"lengths"`` or ``"flex"`` (how non-uniform lengths are handled).
    """

    lengths: torch.Tensor
    uniform: bool
    kernel: str = "lengths"
    _block_mask: object = None
    _pad_mask: torch.Tensor | None = None

    def pad_mask(self, kv_len: int) -> torch.Tensor:
        """(A, 1, 1, S) bool key-padding mask, built once per forward and shared by every layer."""
        if self._pad_mask is None or self._pad_mask.shape[-1] != kv_len:
            keys = torch.arange(kv_len, device=self.lengths.device)
            self._pad_mask = (keys[None, :] < self.lengths[:, None])[:, None, None, :]
        return self._pad_mask

    def block_mask(self, q_len: int, kv_len: int):
        """flex_attention BlockMask of the lengths, built once per forward and shared by every layer."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            lengths = self.lengths

            def mask_mod(b, h, q, k):
                return k < lengths[b]

            self._block_mask = create_block_mask(mask_mod, B=lengths.shape[0], H=None, Q_LEN=q_len, KV_LEN=kv_len,
                                                 device=lengths.device)
        return self._block_mask


def block_kv_lengths(starts: torch.Tensor, key_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """(A,) key lengths of a one-block forward, or −1 for rows whose pattern a length cannot express.

    Args:
        starts: (A,) first slot of each row's chunk (its committed cache length).
        key_valid: (A, T) bool, chunk positions other tokens may attend to.
        block_size: block size of the attention pattern.
    A length expresses the mask when T == block_size, the chunk starts on a block boundary and the valid chunk
    positions are a prefix of it.
    """
    t = key_valid.shape[1]
    n = key_valid.sum(1)
    prefix = (torch.arange(t, device=key_valid.device)[None, :] < n[:, None]) == key_valid
    ok = prefix.all(1) & (starts % block_size == 0) & torch.tensor(t == block_size, device=starts.device)
    return torch.where(ok, starts + n, torch.full_like(starts, -1))


_COMPILED_FLEX: dict = {}


def _flex(query, key, value, block_mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda:  # eager flex materialises the scores (a reference only); compiled, it is a fused kernel
        fn = _COMPILED_FLEX.setdefault("fn", torch.compile(flex_attention))
    else:
        fn = flex_attention
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


def kv_lengths_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function for `KVLengths` masks: query (A, Hq, T, D), key/value (A, Hkv, S, D).

    Grouped-query heads are folded into the query axis, (A, Hkv, groups·T, D), instead of passing ``enable_gqa``:
    every query of a row sees the same keys, so the (A, 1, 1, S) mask still broadcasts, K/V are never repeated,
    and the call is a plain multi-head one that every SDPA backend accepts (not all of them take ``enable_gqa``).
    """
    m = attention_mask
    if not isinstance(m, KVLengths):
        raise TypeError(f"{LENGTHS_IMPL} attention needs a KVLengths mask, got {type(m).__name__}")
    a, hq, t, d = query.shape
    hkv = key.shape[1]
    if not m.uniform and m.kernel == "flex":
        out = _flex(query, key, value, m.block_mask(t, key.shape[2]), scaling)
        return out.transpose(1, 2).contiguous(), None
    q = query.reshape(a, hkv, (hq // hkv) * t, d)
    mask = None if m.uniform else m.pad_mask(key.shape[2])
    out = _sdpa(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(a, hq, t, d).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `kv_lengths_attention` available to transformers models as ``LENGTHS_IMPL`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(LENGTHS_IMPL, kv_lengths_attention)
