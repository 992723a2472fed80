"""Attention masks of block diffusion (spec §1.2), as dense booleans (SDPA) or flex_attention BlockMasks (CUDA).

Every token of a packed training row is described by three integers:
    copy  : 0 for the clean copy x_0, c ≥ 1 for the c-th noisy copy (the doubled sequence has one noisy copy; the
            trajectory estimator packs several denoising steps as several noisy copies);
    block : absolute block index, position // block_size (blocks are aligned to position 0 of the row);
    valid : False for padding.
Rules (True = may attend):
    clean q → clean k : block(k) ≤ block(q)                (block-causal, bidirectional inside a block)
    noisy q → same copy k : block(k) == block(q)           (bidirectional inside the block)
    noisy q → clean k : block(k) < block(q)                (strictly earlier clean blocks)
    everything else (clean → noisy, noisy → other noisy copy) : never
Padding keys are never attended; every query may attend to itself so that padded rows of SDPA stay finite.
"""

from __future__ import annotations

import torch


def segment_ids(lengths: torch.Tensor, seq_len: int, num_copies: int, block_size: int, window_start: int = 0):
    """Per-token (copy, block, valid) for rows laid out as [noisy_1 | … | noisy_K | clean].

    The clean copy covers positions [0, L); each noisy copy covers only [window_start, L), because positions
    before the first masked block are never noisy and would be computed for nothing.

    Args:
        lengths: (B,) valid tokens per row (the rest is right padding).
        seq_len: L, the padded length of the clean copy.
        num_copies: K, noisy copies before the clean one.
        block_size: block size of the attention pattern.
        window_start: W, block-aligned first position of the noisy copies.
    Returns:
        copy, block, valid, pos: each (B, K·(L−W) + L); copy is 1..K for noisy copies and 0 for the clean one;
        pos is the position id of every token.
    """
    device = lengths.device
    if window_start % block_size:
        raise ValueError(f"window_start={window_start} must be a multiple of block_size={block_size}")
    clean_pos = torch.arange(seq_len, device=device)
    noisy_pos = torch.arange(window_start, seq_len, device=device)
    width = seq_len - window_start
    copies = torch.cat(
        [torch.full((width,), c + 1, device=device, dtype=torch.long) for c in range(num_copies)]
        + [torch.zeros(seq_len, device=device, dtype=torch.long)]
    )
    pos = torch.cat([noisy_pos.repeat(num_copies), clean_pos])
    block = pos // block_size
    valid = pos.unsqueeze(0) < lengths.unsqueeze(1)
    batch = lengths.shape[0]
    return (copies.unsqueeze(0).expand(batch, -1), block.unsqueeze(0).expand(batch, -1), valid,
            pos.unsqueeze(0).expand(batch, -1))


def _allowed(cq, bq, ck, bk):
    clean_q, clean_k = cq == 0, ck == 0
    return (clean_q & clean_k & (bk <= bq)) | (~clean_q & (ck == cq) & (bk == bq)) | (~clean_q & clean_k & (bk < bq))


def dense_block_diffusion_mask(copy: torch.Tensor, block: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool mask for SDPA from per-token segment ids of shape (B, S)."""
    allowed = _allowed(copy[:, :, None], block[:, :, None], copy[:, None, :], block[:, None, :])
    allowed = allowed & valid[:, None, :]
    eye = torch.eye(copy.shape[1], dtype=torch.bool, device=copy.device)
    return (allowed | eye).unsqueeze(1)


def flex_block_diffusion_mask(copy: torch.Tensor, block: torch.Tensor, valid: torch.Tensor):
    """The same rules as a flex_attention BlockMask (sparse; used for training on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        cq, bq, ck, bk = copy[b, q], block[b, q], copy[b, k], block[b, k]
        return (_allowed(cq, bq, ck, bk) & valid[b, k]) | (q == k)

    batch, seq = copy.shape
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=seq, KV_LEN=seq, device=copy.device)


def block_causal_mask(lengths: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """(B, 1, L, L) bool block-causal mask (the clean copy alone): plain inference over whole sequences."""
    copy, block, valid, _ = segment_ids(lengths, seq_len, 0, block_size)
    return dense_block_diffusion_mask(copy, block, valid)
