"""A per-row KV cache for batched block decoding with rows at different positions (spec §2.1).

Slot j of row r holds absolute position j of that row, so blocks stay aligned to absolute positions however long
each prompt is. ``lengths[r]`` is the number of committed (stored) slots; the block being decoded lives at slots
[lengths[r], lengths[r] + T). Every forward writes the chunk's K/V into its slots in place; the write becomes
permanent only when the caller advances ``lengths`` (the store pass), otherwise the next forward overwrites it.
This avoids concatenating the whole cache at each denoising step.

The object implements the one method transformers' attention layers call on a cache, ``update``.
"""

from __future__ import annotations

import torch


class BlockKVCache:
    """K/V buffers of shape (rows, max_len, kv_heads, head_dim) per layer, plus per-row committed lengths."""

    def __init__(self, num_layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int, *, dtype, device):
        shape = (rows, max_len, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.last_hidden: torch.Tensor | None = None  # (rows, hidden) at slot lengths-1; used by shifted models
        self.max_len = max_len
        self._rows: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    def bind(self, rows: torch.Tensor | None, slots: torch.Tensor, kv_len: int) -> None:
        """Set where the next forward writes (slots, (A, T)) and how many slots it reads (kv_len)."""
        if kv_len > self.max_len:
            raise ValueError(f"KV cache overflow: need {kv_len} slots, the cache holds {self.max_len}")
        self._rows, self._slots, self._kv_len = rows, slots, kv_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (A, H, T, D) K/V at the bound slots; return the (A, H, kv_len, D) K/V the chunk attends to."""
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows if self._rows is not None else torch.arange(kb.shape[0], device=kb.device)
        kb[rows[:, None], self._slots] = key_states.transpose(1, 2).to(kb.dtype)
        vb[rows[:, None], self._slots] = value_states.transpose(1, 2).to(vb.dtype)
        if self._rows is None:
            k, v = kb[:, : self._kv_len], vb[:, : self._kv_len]
        else:
            k, v = kb[self._rows, : self._kv_len], vb[self._rows, : self._kv_len]
        return k.transpose(1, 2), v.transpose(1, 2)

    def repeat_interleave(self, repeats: int) -> BlockKVCache:
        """Give each row ``repeats`` copies in place (the G samples of a prompt share its prefill)."""
        if repeats != 1:
            self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
            self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
            self.lengths = self.lengths.repeat_interleave(repeats)
            if self.last_hidden is not None:
                self.last_hidden = self.last_hidden.repeat_interleave(repeats, dim=0)
        return self
