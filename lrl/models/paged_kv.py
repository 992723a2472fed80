"""A paged KV cache for block decoding: one page per diffusion block, a page table per row (spec §2.1).

Block diffusion commits whole blocks, so a committed block is exactly one page: row r's block j (absolute positions
[j·P, (j+1)·P), P = block size) lives in page ``table[r, j]``. Memory is then proportional to the blocks rows
hold, not to rows × the longest possible response (the dense `BlockKVCache`). What this buys:

* a row that finishes returns its pages; no other row's K/V moves (`keep_rows` compacts only the small page table);
* the G samples of a prompt share the pages of its full prompt blocks (reference counts); a page is private from
  the first block a row writes (the first generation block may hold the prompt tail);
* the pool has a fixed size, decided by a byte budget, so the engine can admit rows while pages are free
  (`lrl.rollout.engine`) and never allocates past it.

Page 0 is a scratch page: table entries of blocks a row does not hold point there, so padding positions (prefill of
shorter prompts, the padding rows of a CUDA-graph forward) write into it and nothing reads it unmasked.

Attention reads a row's pages by gathering them (`paged_attention`). To keep that transient bounded, the rows of a
forward are split into chunks whose gathered keys fit ``gather_tokens`` slots (rows sorted by length, so a long row
does not pad the short ones); each chunk runs SDPA under the forward's own mask (the dense block mask, or per-row key
lengths, `lrl.models.decode_attention`). A CUDA-graph forward (``buffer_rows``) gathers in one piece from fixed
buffers, so the graph stays shape- and address-static.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lrl.models import decode_attention as kvl

PAGED_IMPL = "lrl_paged"


class PagedKVCache:
    """K/V pools of ``num_pages`` pages × ``page_size`` slots per layer, a page table and committed lengths per row.

    Args:
        num_layers, kv_heads, head_dim: model geometry.
        num_pages: pages in the pool, the scratch page included (so ``num_pages - 1`` can be allocated).
        page_size: slots per page (the rollout block size).
        max_rows: rows the page table holds (rows in use ≤ this).
        max_blocks: blocks per row (the longest row's slots ÷ page size).
        gather_tokens: most key slots (rows × keys) one attention chunk gathers; None: no chunking.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int, *,
                 max_rows: int, max_blocks: int, dtype, device, gather_tokens: int | None = None):
        if num_pages < 2:
            raise ValueError(f"a paged cache needs at least 2 pages (one is scratch), got {num_pages}")
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.key_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size, self.max_blocks = page_size, max_blocks
        self.max_len = max_blocks * page_size
        self.table = torch.zeros(max_rows, max_blocks, dtype=torch.long, device=device)  # 0: scratch
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self.last_hidden: torch.Tensor | None = None  # (rows, hidden) at slot lengths-1; used by shifted models
        self.gather_tokens = gather_tokens
        self._free = list(range(num_pages - 1, 0, -1))  # a stack: the lowest ids go out first
        self._refs: Counter[int] = Counter()
        self._rows = self._slots = self._write_rows = None
        self._kv_len = self._n = 0
        self.peak_pages = 0

    # ------------------------------------------------------------------ geometry and accounting
    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def capacity(self) -> int:
        """Rows the page table holds."""
        return self.table.shape[0]

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_pages(self) -> int:
        return self.key_pools[0].shape[0] if self.key_pools else 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers, K and V."""
        k = self.key_pools[0]
        return 2 * len(self.key_pools) * k[0].numel() * k.element_size()

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    # ------------------------------------------------------------------ pages
    def alloc(self, n: int) -> list[int]:
        """``n`` free pages (reference count 1), or an error when the pool has fewer (callers check first)."""
        if n > len(self._free):
            raise RuntimeError(f"paged KV cache: {n} pages asked, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for p in out:
            self._refs[p] = 1
        self.peak_pages = max(self.peak_pages, self.used_pages)
        return out

    def share(self, pages: list[int], times: int = 1) -> None:
        for p in pages:
            self._refs[p] += times

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; pages no row references go back to the pool."""
        for p in pages:
            if p == 0:
                continue
            self._refs[p] -= 1
            if self._refs[p] == 0:
                del self._refs[p]
                self._free.append(p)

    def row_pages(self, rows: torch.Tensor) -> list[list[int]]:
        """The pages each of ``rows`` holds (non-scratch table entries), on the host."""
        return [[p for p in r if p] for r in self.table[rows].tolist()]

    def open_block(self, rows: torch.Tensor, blocks: torch.Tensor) -> None:
        """Give each row in ``rows`` a private page for its block ``blocks`` (both (n,) long)."""
        if rows.numel():
            pages = torch.tensor(self.alloc(rows.numel()), dtype=torch.long, device=self.device)
            self.table[rows, blocks] = pages

    # ------------------------------------------------------------------ rows
    def add_rows(self, prompt_pages: list[list[int]]) -> torch.Tensor:
        """Append one row per entry, holding those pages as its first blocks; returns the new rows' indices."""
        n0, n = self.num_rows, len(prompt_pages)
        if n0 + n > self.capacity:
            raise RuntimeError(f"paged KV cache: {n0 + n} rows exceed its capacity of {self.capacity}")
        self.table[n0 : n0 + n] = 0
        for i, pages in enumerate(prompt_pages):
            if pages:
                self.table[n0 + i, : len(pages)] = torch.tensor(pages, dtype=torch.long, device=self.device)
        self.lengths = torch.cat([self.lengths, torch.zeros(n, dtype=torch.long, device=self.device)])
        if self.last_hidden is not None:
            self.last_hidden = torch.cat([self.last_hidden, self.last_hidden.new_zeros(n, self.last_hidden.shape[1])])
        return torch.arange(n0, n0 + n, device=self.device)

    def expand_rows(self, rows: torch.Tensor, repeats: list[int]) -> None:
        """Replace the trailing ``rows`` (prefilled prompts) by ``repeats[i]`` copies of row i, sharing its pages."""
        if not rows.numel():
            return
        if min(repeats) < 1:
            raise ValueError(f"expand_rows: repeats must be >= 1, got {min(repeats)}")
        n0 = int(rows[0])
        for pages, r in zip(self.row_pages(rows), repeats):
            self.share(pages, r - 1)
        n = sum(repeats)
        if n0 + n > self.capacity:
            raise RuntimeError(f"paged KV cache: {n0 + n} rows exceed its capacity of {self.capacity}")
        rep = torch.tensor(repeats, device=self.device)
        self.table[n0 : n0 + n] = self.table[rows].repeat_interleave(rep, dim=0)
        self.lengths = torch.cat([self.lengths[:n0], self.lengths[rows].repeat_interleave(rep)])
        if self.last_hidden is not None:
            self.last_hidden = torch.cat([self.last_hidden[:n0], self.last_hidden[rows].repeat_interleave(rep, dim=0)])

    def keep_rows(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (ascending) and compact the page table in place; the other rows' pages are released."""
        n_old, n = self.num_rows, idx.numel()
        gone = torch.ones(n_old, dtype=torch.bool, device=self.device)
        gone[idx] = False
        for pages in self.row_pages(gone.nonzero().squeeze(1)):
            self.release(pages)
        self.table[:n] = self.table[idx]
        self.table[n:n_old] = 0  # rows past the ones in use hold only scratch (CUDA-graph padding rows write there)
        self.lengths = self.lengths[idx]
        if self.last_hidden is not None:
            self.last_hidden = self.last_hidden[idx]

    def reset(self) -> None:
        """Drop every row and return every page (the pools stay allocated)."""
        self.keep_rows(torch.zeros(0, dtype=torch.long, device=self.device))
        self.last_hidden = None
        self.peak_pages = 0

    # ------------------------------------------------------------------ the forward's view
    def bind(self, rows: torch.Tensor | None, slots: torch.Tensor, kv_len: int, *,
             buffer_rows: int | None = None) -> None:
        """Set where the next forward writes (slots, (A, T)) and how many slots it reads (kv_len); see
        `BlockKVCache.bind` (``buffer_rows``: the forward's rows are the first A rows of the page table)."""
        if kv_len > self.max_len:
            raise ValueError(f"KV cache overflow: need {kv_len} slots, the cache holds {self.max_len}")
        self._rows, self._slots, self._kv_len = rows, slots, kv_len
        self._n = self.num_rows if buffer_rows is None else buffer_rows
        write_rows = rows if rows is not None else torch.arange(self._n, device=slots.device)
        table = self.table[write_rows]
        self._write_pages = table.gather(1, slots // self.page_size)  # (A, T)
        self._write_offsets = slots % self.page_size
        self._read_pages = table[:, : -(-kv_len // self.page_size)]  # (A, blocks read)

    def attention_mask(self, inner, starts: torch.Tensor | None = None) -> PagedMask:
        """Wrap the forward's mask (a dense (A, 1, T, S) bool mask or `KVLengths`) for `paged_attention`.

        ``starts`` (A,), the rows' first chunk slot, decides the chunks: a row reads ``starts + T`` keys. None
        (a CUDA-graph forward) gathers all rows in one piece.
        """
        chunks = None
        # the bound kv_len is the longest row's need: only a forward past the budget reads the rows' lengths
        if starts is not None and self.gather_tokens is not None and starts.numel() * self._kv_len > self.gather_tokens:
            need = (starts + self._slots.shape[1]).tolist()
            chunks = _plan_chunks(need, self.gather_tokens, self.device)
        return PagedMask(inner, self._read_pages, self._kv_len, chunks)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write (A, H, T, D) K/V at the bound slots; return this layer's pools for `paged_attention`."""
        kp, vp = self.key_pools[layer_idx], self.value_pools[layer_idx]
        kp[self._write_pages, self._write_offsets] = key_states.transpose(1, 2).to(kp.dtype)
        vp[self._write_pages, self._write_offsets] = value_states.transpose(1, 2).to(vp.dtype)
        return kp, vp


def _plan_chunks(need: list[int], budget: int, device) -> list[tuple[torch.Tensor, int]]:
    """Rows sorted by keys needed (longest first), cut into chunks of at most ``budget`` gathered slots (at least
    one row each): [(row indices, keys of the chunk)]."""
    order = sorted(range(len(need)), key=lambda r: -need[r])
    chunks, start = [], 0
    while start < len(order):
        width = need[order[start]]
        rows = max(1, budget // max(width, 1))
        part = order[start : start + rows]
        chunks.append((torch.tensor(part, dtype=torch.long, device=device), width))
        start += rows
    return chunks


@dataclass
class PagedMask:
    """What `paged_attention` needs besides the pools: the forward's own mask, the rows' pages, the chunks."""

    inner: object  # (A, 1, T, S) bool, or kvl.KVLengths
    pages: torch.Tensor  # (A, blocks) page ids read by each row
    kv_len: int  # S
    chunks: list[tuple[torch.Tensor, int]] | None = None  # [(rows, keys)], None: all rows at once
    _masks: dict = field(default_factory=dict)  # per chunk, the mask in the form SDPA takes (shared by all layers)


def _chunk_mask(m: PagedMask, key, rows, kv: int, groups: int, t: int, dtype):
    """The SDPA mask of one chunk: (a, 1, groups·T, kv) additive for a dense mask (the engine's CPU path, as
    `lrl.rollout.engine._gqa_sdpa` computes it), (a, 1, 1, kv) bool for key lengths, None when uniform."""
    hit = m._masks.get(key)
    if hit is not None:
        return hit
    inner = m.inner
    if isinstance(inner, kvl.KVLengths):
        if inner.uniform and rows is None:
            mask = None
        else:
            lens = inner.lengths if rows is None else inner.lengths[rows]
            mask = (torch.arange(kv, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]
    else:
        dense = inner[..., :kv] if rows is None else inner[rows][..., :kv]
        mask = torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(~dense, torch.finfo(dtype).min)
        if groups > 1:
            mask = mask.repeat(1, 1, groups, 1)
    m._masks[key] = mask
    return mask


def _gather(pool: torch.Tensor, pages: torch.Tensor, kv: int) -> torch.Tensor:
    """(a, H, kv, D) keys (or values) of the rows whose pages are ``pages`` (a, blocks)."""
    a, nb = pages.shape
    g = pool[pages[:, : -(-kv // pool.shape[1])]]  # (a, blocks, P, H, D)
    return g.reshape(a, -1, *pool.shape[2:])[:, :kv].transpose(1, 2)


def paged_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention over a `PagedKVCache`: query (A, Hq, T, D); key/value are the layer's pools.

    Grouped-query heads are folded into the query axis, (a, Hkv, groups·T, D), so K/V are never repeated (as the
    engine's `_gqa_sdpa` and `lrl.models.decode_attention` do).
    """
    m = attention_mask
    if not isinstance(m, PagedMask):
        raise TypeError(f"{PAGED_IMPL} attention needs a PagedMask, got {type(m).__name__}")
    a, hq, t, d = query.shape
    hkv = key.shape[2]
    groups = hq // hkv
    if m.chunks is None:
        k, v = _gather(key, m.pages, m.kv_len), _gather(value, m.pages, m.kv_len)
        mask = _chunk_mask(m, None, None, m.kv_len, groups, t, query.dtype)
        q = query.reshape(a, hkv, groups * t, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        return out.reshape(a, hq, t, d).transpose(1, 2).contiguous(), None
    out = query.new_empty(a, hq, t, d)
    for i, (rows, kv) in enumerate(m.chunks):
        pages = m.pages[rows]
        k, v = _gather(key, pages, kv), _gather(value, pages, kv)
        mask = _chunk_mask(m, i, rows, kv, groups, t, query.dtype)
        q = query[rows].reshape(rows.numel(), hkv, groups * t, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        out[rows] = o.reshape(rows.numel(), hq, t, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `paged_attention` available to transformers models as ``PAGED_IMPL`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PAGED_IMPL, paged_attention)
