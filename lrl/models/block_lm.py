"""The block-diffusion LM: a transformers decoder plus the training forward and the inference primitives.

The network itself is a stock transformers model (Qwen3/Qwen2; SDAR checkpoints are Qwen3 weights). This module
adds what makes it a block-diffusion model (spec §1.2–§1.3):

* `diffusion_logits`: the training forward over [noisy_1 | … | noisy_K | clean] copies of a row, all with the
  same position ids, under the block-diffusion mask of `lrl.models.masks`; logits only at masked positions.
  K = 1 is SDAR's doubled sequence; K > 1 packs several denoising steps of a trajectory into one row.
* `new_cache` / `forward_chunk`: prefill of block-aligned prompts into a `BlockKVCache`, forwards of the current
  block against the cache (not stored), and store passes that commit a finished block.

Attention: SDPA with a dense boolean 4-D mask (CPU and default); flex_attention with a BlockMask for training on
CUDA when ``attention="flex"`` (flex has no backward on CPU; transformers' eager path mishandles bool masks).
The one-block forwards of decoding use per-row key lengths instead of a dense mask on CUDA
(``decode_attention``, see `lrl.models.decode_attention`): SDPA without a mask (flash) when all rows read the
same keys.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from lrl.models import decode_attention as kvl
from lrl.models import paged_kv
from lrl.models.config import BlockDiffusionConfig
from lrl.models.kv_cache import BlockKVCache
from lrl.models.masks import (
    dense_block_diffusion_mask,
    flex_block_diffusion_mask,
    segment_ids,
    windowed_segment_ids,
)
from lrl.models.paged_kv import PagedKVCache


class BlockDiffusionLM(nn.Module):
    """A causal-LM checkpoint used as a block-diffusion model.

    Args:
        model: a transformers ``*ForCausalLM`` (``.model`` is the decoder, ``.lm_head`` the output layer).
        bd_config: mask id, block size and logit shift of this checkpoint.
        identity: config.json keys that make the checkpoint a diffusion model for other tools (model_type,
            architectures, auto_map, …); written back by `lrl.models.loading.save_checkpoint`.
        attention: ``"sdpa"`` (dense bool mask, works everywhere) or ``"flex"`` (BlockMask, CUDA training).
        decode_attention: attention of the one-block forwards of decoding: ``"dense"`` (the boolean mask),
            ``"lengths"`` (per-row key lengths: SDPA with no mask when all rows read the same keys, else a
            key-padding mask), ``"flex"`` (lengths; a flex_attention BlockMask when they differ) or ``"auto"``
            (``lengths`` on CUDA, ``dense`` elsewhere). Prefill always uses the dense mask.
        planner: optional dUltra planner head (`lrl.models.planner.PlannerHead`), saved and loaded with the
            checkpoint; None for models without one.
    """

    def __init__(
        self, model: nn.Module, bd_config: BlockDiffusionConfig, identity: dict | None = None, attention: str = "sdpa",
        decode_attention: str = "auto",
        planner: nn.Module | None = None,
    ):
        super().__init__()
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {attention!r}")
        if decode_attention not in kvl.KERNELS:
            raise ValueError(f"decode_attention must be one of {kvl.KERNELS}, got {decode_attention!r}")
        self.decode_attention = decode_attention
        self.model = model
        self.bd = bd_config
        self.identity = dict(identity or {})
        self.attention = attention
        self.planner = planner
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        model.config._attn_implementation = "sdpa"

    # ------------------------------------------------------------------ basics
    @property
    def hf_config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def max_length(self) -> int:
        return int(getattr(self.hf_config, "max_position_embeddings", 1 << 30))

    def _decoder(self, input_ids, position_ids, mask, cache=None) -> torch.Tensor:
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.model.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask={"full_attention": mask, "sliding_attention": mask},
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    @contextlib.contextmanager
    def _attn_impl(self, impl: str):
        old = self.hf_config._attn_implementation
        self.hf_config._attn_implementation = impl
        try:
            yield
        finally:
            self.hf_config._attn_implementation = old

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # ------------------------------------------------------------------ training forward
    def diffusion_hidden(
        self, input_ids: torch.Tensor, noisy_masks: torch.Tensor, lengths: torch.Tensor, block_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Decoder states of the packed [noisy_1 | … | noisy_K | clean] rows.

        Each row's noisy copies start at its own block-aligned first masked position S_r (earlier positions are
        never masked, so noisy copies of them would be pure waste: prompts are often longer than responses, and
        of different lengths) and span a common width W (whole blocks, enough for the longest row's window).

        Args:
            input_ids: (B, L) clean tokens x_0, right-padded.
            noisy_masks: (B, K, L) bool; copy k is x_0 with MASK where noisy_masks[:, k] is True.
            lengths: (B,) valid tokens per row.
            block_size: attention block size (default: the model's).
        Returns:
            hidden (B, K·W + L, H), S (B,) and W; noisy copy k of row r occupies [k·W, (k+1)·W) and holds
            positions S_r..S_r+W−1 (those past the row's length are padding); the clean copy is the last L.
        """
        b, length = input_ids.shape
        k = noisy_masks.shape[1]
        bs = block_size or self.bd.block_size
        dev = input_ids.device
        lengths = lengths.to(dev)
        masked = noisy_masks.any(dim=1)  # (B, L)
        first = torch.where(masked.any(dim=1), masked.long().argmax(dim=1), lengths)  # nothing masked: the row end
        starts = torch.minimum(first, lengths) // bs * bs
        width = int(((lengths - starts).max() + bs - 1) // bs * bs) if b else 0
        window_pos = (starts[:, None] + torch.arange(width, device=dev)).clamp(max=max(length - 1, 0))
        inside = starts[:, None] + torch.arange(width, device=dev) < lengths[:, None]
        window_masks = noisy_masks.gather(2, window_pos[:, None].expand(-1, k, -1)) & inside[:, None]
        mask_tok = torch.full_like(window_masks, self.bd.mask_token_id, dtype=input_ids.dtype)
        noisy = torch.where(window_masks, mask_tok, input_ids.gather(1, window_pos)[:, None])
        packed = torch.cat([noisy.reshape(b, k * width), input_ids], dim=1)
        copy, block, valid, pos = windowed_segment_ids(lengths, length, k, bs, starts, width)
        if self.attention == "flex" and input_ids.is_cuda:
            mask = flex_block_diffusion_mask(copy, block, valid)
            with self._attn_impl("flex_attention"):
                return self._decoder(packed, pos, mask), starts, width
        return self._decoder(packed, pos, dense_block_diffusion_mask(copy, block, valid)), starts, width

    def diffusion_states(
        self,
        input_ids: torch.Tensor,
        noisy_masks: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states predicting the masked tokens, (M, H), in the order of ``select.nonzero()`` (b, k, l).

        ``select`` (B, K, L) bool ⊆ ``noisy_masks`` picks the positions (default: every masked one). Without logit
        shift, position l of a noisy copy predicts token l. With a shift (AR-adapted models), token l is predicted
        at l − 1 of the same copy when l − 1 is in the same block, else at l − 1 of the clean copy (the last token
        of the previous, already-known block).
        """
        hidden, starts, width = self.diffusion_hidden(input_ids, noisy_masks, lengths, block_size)
        b_idx, k_idx, l_idx = (noisy_masks if select is None else select).nonzero(as_tuple=True)
        k = noisy_masks.shape[1]
        src = k_idx * width + (l_idx - starts[b_idx])
        if self.bd.logit_shift:
            bs = block_size or self.bd.block_size
            if bool((l_idx == 0).any()):
                raise ValueError("with logit_shift, position 0 cannot be masked (nothing precedes it)")
            same_block = (l_idx % bs) != 0
            src = torch.where(same_block, src - 1, k * width + l_idx - 1)
        return hidden[b_idx, src]

    def diffusion_logits(
        self, input_ids: torch.Tensor, noisy_masks: torch.Tensor, lengths: torch.Tensor, block_size: int | None = None
    ) -> torch.Tensor:
        """Logits predicting the masked tokens, (M, V), in the order of ``noisy_masks.nonzero()`` (b, k, l)."""
        return self.logits(self.diffusion_states(input_ids, noisy_masks, lengths, block_size))

    def forward(
        self,
        input_ids: torch.Tensor,
        noisy_masks: torch.Tensor,
        lengths: torch.Tensor,
        block_size: int | None = None,
        *,
        select: torch.Tensor | None = None,
        head=None,
    ):
        """The training forward; sharding wrappers (FSDP) gather parameters around it.

        Default: `diffusion_logits`. With ``head``, returns ``head(states, output_layer)`` for the states of
        `diffusion_states` (positions ``select``), so a caller can score tokens without (M × V) logits (e.g.
        `lrl.algorithms.token_logprobs`) while the output layer's parameters are gathered.
        """
        if head is None and select is None:
            return self.diffusion_logits(input_ids, noisy_masks, lengths, block_size)
        states = self.diffusion_states(input_ids, noisy_masks, lengths, block_size, select)
        return self.logits(states) if head is None else head(states, self.model.get_output_embeddings())

    # ------------------------------------------------------------------ inference primitives
    def _kv_geometry(self) -> tuple[int, int, int]:
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V one token holds over all layers (in ``dtype``, default the model's)."""
        layers, kv_heads, head_dim = self._kv_geometry()
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype or self.dtype).element_size()

    def new_paged_cache(self, num_pages: int, page_size: int, max_rows: int, max_blocks: int,
                        gather_tokens: int | None = None) -> PagedKVCache:
        """An empty `PagedKVCache` of ``num_pages`` pages of ``page_size`` slots (see `lrl.models.paged_kv`)."""
        layers, kv_heads, head_dim = self._kv_geometry()
        return PagedKVCache(layers, num_pages, page_size, kv_heads, head_dim, max_rows=max_rows, max_blocks=max_blocks,
                            dtype=self.dtype, device=self.device, gather_tokens=gather_tokens)

    def new_cache(self, rows: int, max_len: int, capacity: int | None = None) -> BlockKVCache:
        """An empty `BlockKVCache` for ``rows`` rows of ``max_len`` slots (buffers for ``capacity`` rows)."""
        layers, kv_heads, head_dim = self._kv_geometry()
        return BlockKVCache(layers, rows, max_len, kv_heads, head_dim, dtype=self.dtype, device=self.device,
                            capacity=capacity)

    @torch.no_grad()
    def forward_chunk(
        self,
        cache: BlockKVCache,
        input_ids: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
        block_size: int,
        key_valid: torch.Tensor | None = None,
        store: torch.Tensor | None = None,
        return_states: bool = False,
        logits: bool = True,
    ) -> torch.Tensor:
        """Run T tokens per row at slots [lengths[r], lengths[r] + T) against the row's cache.

        Args:
            cache: the rows' `BlockKVCache`.
            input_ids: (A, T) tokens of the chunk (a decoding block, or block-aligned prompt blocks at prefill).
            rows: (A,) cache rows of the chunk (None: all rows, in order).
            block_size: block size of the attention pattern inside the chunk (rollout block size).
            key_valid: (A, T) bool, chunk positions other tokens may attend to (False: padding or positions past
                the generation budget). Default all True.
            store: (A,) long, how many chunk slots to commit per row (the store pass); None commits nothing.
            return_states: also return the (A, T, H) final states the logits are read from (the planner's input).
            logits: False returns only those states, (A, T, H), so a caller can compute logits where it needs them
                (the engine: at masked positions, in bounded chunks).
        Returns:
            (A, T, V) logits where ``[:, j]`` predicts the token at chunk position j (the shift of AR-adapted
            models is applied here, using the stored state of the previous position).
        """
        a, t = input_ids.shape
        device = input_ids.device
        starts = cache.lengths if rows is None else cache.lengths[rows]
        slots = starts[:, None] + torch.arange(t, device=device)
        if key_valid is None:
            key_valid = torch.ones(a, t, dtype=torch.bool, device=device)
        kernel = kvl.resolve_kernel(self.decode_attention, device)
        lengths = None
        if kernel != "dense" and t == block_size:
            kv_lens = kvl.block_kv_lengths(starts, key_valid, block_size)
            max_start, min_len = torch.stack([starts.max(), kv_lens.min()]).tolist()  # one host sync, as before
            kv_len = max_start + t
            if min_len >= 1:  # every row's pattern is a key length
                lengths = kvl.KVLengths(kv_lens, uniform=min_len == kv_len, kernel=kernel)
        else:
            kv_len = int(starts.max()) + t
        paged = isinstance(cache, PagedKVCache)
        if lengths is not None:
            cache.bind(rows, slots, kv_len)
            if paged:
                paged_kv.register()
                impl, mask = paged_kv.PAGED_IMPL, cache.attention_mask(lengths, starts)
            else:
                kvl.register()
                impl, mask = kvl.LENGTHS_IMPL, lengths
            with self._attn_impl(impl):
                hidden = self._decoder(input_ids, slots, mask, cache=cache)
            return self._chunk_outputs(cache, hidden, rows, store, return_states, logits)
        kslot = torch.arange(kv_len, device=device)
        rel = kslot[None, :] - starts[:, None]  # (A, kv_len) key slot relative to the chunk start
        in_chunk = (rel >= 0) & (rel < t)
        chunk_valid = torch.gather(key_valid, 1, rel.clamp(0, t - 1)) & in_chunk
        kvalid = (rel < 0) | chunk_valid  # committed slots or valid chunk slots
        qblock = slots // block_size
        kblock = kslot // block_size
        mask = kvalid[:, None, :] & (kblock[None, None, :] <= qblock[:, :, None])
        mask = mask | (kslot[None, None, :] == slots[:, :, None])
        cache.bind(rows, slots, kv_len)
        if paged:
            paged_kv.register()
            with self._attn_impl(paged_kv.PAGED_IMPL):
                hidden = self._decoder(input_ids, slots, cache.attention_mask(mask.unsqueeze(1), starts), cache=cache)
        else:
            hidden = self._decoder(input_ids, slots, mask.unsqueeze(1), cache=cache)
        return self._chunk_outputs(cache, hidden, rows, store, return_states, logits)

    def _chunk_outputs(self, cache, hidden: torch.Tensor, rows, store, return_states: bool = False,
                       logits: bool = True):
        """Logits of a chunk's hidden states (with the logit shift) and its store pass (see `forward_chunk`)."""
        a, device = hidden.shape[0], hidden.device
        if self.bd.logit_shift:
            prev = cache.last_hidden if rows is None or cache.last_hidden is None else cache.last_hidden[rows]
            if prev is None:
                prev = torch.zeros_like(hidden[:, 0])
            states = torch.cat([prev[:, None], hidden[:, :-1]], dim=1)
        else:
            states = hidden
        out = self.logits(states) if logits else None
        if store is not None:
            store = store.to(device)
            if self.bd.logit_shift:
                if cache.last_hidden is None:
                    cache.last_hidden = torch.zeros(cache.num_rows, hidden.shape[-1], dtype=hidden.dtype, device=device)
                last = hidden[torch.arange(a, device=device), (store - 1).clamp(min=0)]
                target = torch.arange(cache.num_rows, device=device) if rows is None else rows
                keep = store > 0
                cache.last_hidden[target[keep]] = last[keep]
            if rows is None:
                cache.lengths += store
            else:
                cache.lengths[rows] += store
        if not logits:
            return states
        return (out, states) if return_states else out

    @torch.no_grad()
    def full_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
        """Uncached reference: (B, L, V) logits of whole sequences under the block-causal mask."""
        copy, block, valid, pos = segment_ids(lengths.to(input_ids.device), input_ids.shape[1], 0, block_size)
        hidden = self._decoder(input_ids, pos, dense_block_diffusion_mask(copy, block, valid))
        if self.bd.logit_shift:
            hidden = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
        return self.logits(hidden)
