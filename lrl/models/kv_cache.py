"""A per-row KV cache for batched block decoding with rows at different positions (spec §2.1).

Slot j of row r holds absolute position j of that row, so blocks stay aligned to absolute positions however long
each prompt is. ``lengths[r]`` is the number of committed (stored) slots; the block being decoded lives at slots
[lengths[r], lengths[r] + T). Every forward writes the chunk's K/V into its slots in place; the write becomes
permanent only when the caller advances ``lengths`` (the store pass), otherwise the next forward overwrites it.
This avoids concatenating the whole cache at each denoising step.

The K/V live in buffers allocated once with room for ``capacity`` rows; the cache's rows are their first
``num_rows`` rows. Copying a prompt's prefill to its G samples and dropping finished rows move rows inside those
buffers, never reallocate them, so tensors that address the buffers (CUDA graphs, `lrl.models.cuda_graphs`) stay
valid for the cache's whole life.

The object implements the one method transformers' attention layers call on a cache, ``update``.
"""

from __future__ import annotations

import torch


class BlockKVCache:
    """K/V buffers of shape (capacity, max_len, kv_heads, head_dim) per layer, plus per-row committed lengths.

    Args:
        num_layers, rows, max_len, kv_heads, head_dim: cache geometry (``rows`` rows in use at the start).
        capacity: rows the buffers hold (default ``rows``); `repeat_interleave` can grow the rows in use up to it
            without reallocating.
    """

    def __init__(self, num_layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int, *, dtype, device,
                 capacity: int | None = None):
        capacity = rows if capacity is None else capacity
        if capacity < rows:
            raise ValueError(f"capacity ({capacity}) must be at least rows ({rows})")
        shape = (capacity, max_len, kv_heads, head_dim)
        self.key_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.last_hidden: torch.Tensor | None = None  # (rows, hidden) at slot lengths-1; used by shifted models
        self.max_len = max_len
        self._rows: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self._kv_len = 0
        self._n = 0
        self._write_rows: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    @property
    def capacity(self) -> int:
        return self.key_buffers[0].shape[0] if self.key_buffers else 0

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer, the (num_rows, max_len, kv_heads, head_dim) K of the rows in use (views of the buffers)."""
        n = self.num_rows
        return [b[:n] for b in self.key_buffers]

    @property
    def values(self) -> list[torch.Tensor]:
        n = self.num_rows
        return [b[:n] for b in self.value_buffers]

    def bind(self, rows: torch.Tensor | None, slots: torch.Tensor, kv_len: int, *,
             buffer_rows: int | None = None) -> None:
        """Set where the next forward writes (slots, (A, T)) and how many slots it reads (kv_len).

        ``buffer_rows`` (with ``rows=None``): the forward's A rows are the first A rows of the buffers, whether in
        use or not (the padded rows of a CUDA-graph forward, `lrl.models.cuda_graphs`); default the rows in use.
        """
        if kv_len > self.max_len:
            raise ValueError(f"KV cache overflow: need {kv_len} slots, the cache holds {self.max_len}")
        self._rows, self._slots, self._kv_len = rows, slots, kv_len
        self._n = self.num_rows if buffer_rows is None else buffer_rows
        # the write index, built once per forward rather than once per layer
        self._write_rows = (rows if rows is not None else torch.arange(self._n, device=slots.device))[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (A, H, T, D) K/V at the bound slots; return the (A, H, kv_len, D) K/V the chunk attends to."""
        kb, vb = self.key_buffers[layer_idx][: self._n], self.value_buffers[layer_idx][: self._n]
        kb[self._write_rows, self._slots] = key_states.transpose(1, 2).to(kb.dtype)
        vb[self._write_rows, self._slots] = value_states.transpose(1, 2).to(vb.dtype)
        if self._rows is None:
            k, v = kb[:, : self._kv_len], vb[:, : self._kv_len]
        else:
            k, v = kb[self._rows, : self._kv_len], vb[self._rows, : self._kv_len]
        return k.transpose(1, 2), v.transpose(1, 2)

    def repeat_interleave(self, repeats: int) -> BlockKVCache:
        """Give each row ``repeats`` copies in place (the G samples of a prompt share its prefill); the buffers are
        reallocated only when they lack the capacity."""
        if repeats == 1:
            return self
        n, new = self.num_rows, self.num_rows * repeats
        for bufs in (self.key_buffers, self.value_buffers):
            for i, b in enumerate(bufs):
                rows = b[:n].repeat_interleave(repeats, dim=0)
                if b.shape[0] >= new:
                    b[:new] = rows
                else:
                    bufs[i] = rows
        self.lengths = self.lengths.repeat_interleave(repeats)
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden.repeat_interleave(repeats, dim=0)
        return self

    def reset(self, rows: int) -> None:
        """Empty the cache for reuse with ``rows`` rows in use (the buffers stay where they are)."""
        if rows > self.capacity:
            raise ValueError(f"reset: {rows} rows exceed the cache's capacity of {self.capacity}")
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.lengths.device)
        self.last_hidden = None

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (ascending), moved to the front of the buffers in place; the others are dropped."""
        n = idx.numel()
        for bufs in (self.key_buffers, self.value_buffers):
            for b in bufs:  # layer by layer, so at most one layer's kept rows are held twice
                b[:n] = b[idx]
        self.lengths = self.lengths[idx]
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[idx]
