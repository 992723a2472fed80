"""One-block decoding forwards replayed as CUDA graphs, at padded row counts and key lengths.

At small batch a block forward of a large model is launch-bound in eager PyTorch: hundreds of short kernels, each
launched from Python. A CUDA graph replays all of them with one launch, but fixes every shape and address, so
`BlockForwardGraphs` runs the forward in a shape-static form:

* the rows are padded up to a bucket (1, 2, 4, … up to the cache's capacity); a padding row writes its K/V into a
  buffer row the cache is not using, which nothing reads;
* the keys read are padded up to a multiple of ``kv_step`` slots; each row's own key length masks the rest (the
  key-length attention of `lrl.models.decode_attention`, with a key-padding mask);
* the cache is a `BlockKVCache` or a `PagedKVCache`, whose buffers (K/V, or page pools and page table) never move
  while rows are added or dropped; a paged forward gathers its rows' pages from the fixed page table in one piece.

The logits, the logit shift and the store pass's bookkeeping run outside the graph, from its final states: they
are a few kernels, and the logits' (rows × T × V) size would otherwise be fixed by the bucket. Without capture
(CPU, or ``capture=False``) the same shape-static forward runs eagerly; that is how its equality with
`BlockDiffusionLM.forward_chunk` is tested where no GPU is available.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lrl.models import decode_attention as kvl
from lrl.models import paged_kv
from lrl.models.kv_cache import BlockKVCache
from lrl.models.paged_kv import PagedKVCache


@dataclass(repr=False)
class _Shape:
    """The static inputs and output of one (rows, keys) shape, and its graph once captured."""

    ids: torch.Tensor  # (R, T) tokens
    pos: torch.Tensor  # (R, T) slots = absolute positions
    lens: torch.Tensor  # (R,) keys each row attends to
    kv_len: int
    hidden: torch.Tensor | None = None  # (R, T, H) final states
    graph: object = None
    replays: int = field(default=0)


class BlockForwardGraphs:
    """Shape-static one-block forwards over one cache, captured as CUDA graphs per (row bucket, key bucket).

    Args:
        lm: the `BlockDiffusionLM` (its weights may change in place, e.g. `NativeEngine.update_weights`; a captured
            graph reads them where they are).
        cache: the `BlockKVCache` or `PagedKVCache` every forward uses (its buffers must stay allocated while this
            object lives).
        block_size: block size of the forwards (T).
        kv_step: key lengths are padded to a multiple of this many slots (fewer graphs, a little more attention).
        capture: capture CUDA graphs (default: when the cache is on CUDA); False runs the same forward eagerly.
    """

    def __init__(self, lm, cache: BlockKVCache | PagedKVCache, *, block_size: int, kv_step: int = 128,
                 capture: bool | None = None):
        if kv_step < 1:
            raise ValueError(f"kv_step must be >= 1, got {kv_step}")
        self.lm, self.cache, self.block_size, self.kv_step = lm, cache, block_size, kv_step
        device = cache.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError("capture=True needs the cache on a CUDA device")
        self.shapes: dict[tuple[int, int], _Shape] = {}
        self._pool = None

    def row_bucket(self, rows: int) -> int:
        """Smallest power of two ≥ rows, at most the cache's capacity."""
        return min(1 << max(rows - 1, 0).bit_length(), self.cache.capacity)

    def key_bucket(self, kv_len: int) -> int:
        """kv_len rounded up to a multiple of ``kv_step``, at most the cache's slots."""
        return min(-(-kv_len // self.kv_step) * self.kv_step, self.cache.max_len)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, key_valid: torch.Tensor | None = None,
                store: torch.Tensor | None = None, return_states: bool = False, logits: bool = True):
        """`BlockDiffusionLM.forward_chunk` of all the cache's rows (``rows=None``), or None when a row's pattern
        is not a key length (the caller then runs the dense-mask forward)."""
        cache, t = self.cache, self.block_size
        a = input_ids.shape[0]
        if input_ids.shape[1] != t or a != cache.num_rows:
            return None
        starts = cache.lengths
        if key_valid is None:
            key_valid = torch.ones(a, t, dtype=torch.bool, device=input_ids.device)
        kv_lens = kvl.block_kv_lengths(starts, key_valid, t)
        max_start, min_len = torch.stack([starts.max(), kv_lens.min()]).tolist()  # the forward's one host sync
        if min_len < 1 or max_start + t > cache.max_len:
            return None
        key = (self.row_bucket(a), self.key_bucket(max_start + t))
        shape = self.shapes.get(key)
        fresh = shape is None
        if fresh:
            shape = self.shapes[key] = self._new_shape(*key, input_ids.device)
        shape.ids[:a] = input_ids
        shape.pos[:a] = starts[:, None] + torch.arange(t, device=input_ids.device)
        shape.lens[:a] = kv_lens
        if a < key[0]:  # padding rows: unused buffer rows, at slots [0, T), attending to their own block
            shape.ids[a:] = self.lm.bd.mask_token_id
            shape.pos[a:] = torch.arange(t, device=input_ids.device)
            shape.lens[a:] = t
        self._run(shape, fresh)
        hidden = shape.hidden[:a]
        if return_states or not logits:
            hidden = hidden.clone()  # the next replay overwrites the graph's output
        return self.lm._chunk_outputs(cache, hidden, None, store, return_states, logits)

    def _new_shape(self, rows: int, kv_len: int, device) -> _Shape:
        t = self.block_size
        return _Shape(ids=torch.full((rows, t), self.lm.bd.mask_token_id, dtype=torch.long, device=device),
                      pos=torch.arange(t, device=device).repeat(rows, 1),
                      lens=torch.full((rows,), t, dtype=torch.long, device=device), kv_len=kv_len)

    def _static_forward(self, shape: _Shape) -> torch.Tensor:
        mask = kvl.KVLengths(shape.lens, uniform=False, kernel="lengths")
        self.cache.bind(None, shape.pos, shape.kv_len, buffer_rows=shape.ids.shape[0])  # fixed tensors only
        if isinstance(self.cache, PagedKVCache):
            paged_kv.register()
            impl, mask = paged_kv.PAGED_IMPL, self.cache.attention_mask(mask)
        else:
            kvl.register()
            impl = kvl.LENGTHS_IMPL
        with self.lm._attn_impl(impl):
            return self.lm._decoder(shape.ids, shape.pos, mask, cache=self.cache)

    def _run(self, shape: _Shape, fresh: bool) -> None:
        if not self.capture:
            shape.hidden = self._static_forward(shape)
            return
        if fresh:
            # warm-up on a side stream (lazy kernel initialisation must not happen during capture), with the real
            # inputs already in place: it writes the same K/V the replay below writes again
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._static_forward(shape)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                shape.hidden = self._static_forward(shape)
            self._pool = graph.pool()  # every shape's graph shares one memory pool (they never run concurrently)
            shape.graph = graph
        shape.graph.replay()
        shape.replays += 1
