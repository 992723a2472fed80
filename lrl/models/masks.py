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
    """Per-token (copy, block, valid, pos) for rows laid out as [noisy_1 | … | noisy_K | clean].

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
    starts = torch.full_like(lengths, window_start)
    return windowed_segment_ids(lengths, seq_len, num_copies, block_size, starts, seq_len - window_start)


def windowed_segment_ids(lengths: torch.Tensor, seq_len: int, num_copies: int, block_size: int,
                         starts: torch.Tensor, width: int):
    """`segment_ids` with a window per row: row r's noisy copies hold positions [starts[r], starts[r] + width).

    Window positions at or past the row's length are padding (invalid). Rows whose prompts differ in length thus
    pack only their own response blocks into the noisy copies.

    Args:
        lengths: (B,) valid tokens per row.
        seq_len: L, the padded length of the clean copy.
        num_copies: K.
        block_size: block size of the attention pattern.
        starts: (B,) block-aligned first position of each row's noisy copies.
        width: positions per noisy copy (the same for every row).
    Returns:
        copy, block, valid, pos: each (B, K·width + L).
    """
    device = lengths.device
    lengths, starts = lengths.to(device), starts.to(device)
    if bool((starts % block_size != 0).any()):
        raise ValueError(f"window starts {starts.tolist()} must be multiples of block_size={block_size}")
    batch = lengths.shape[0]
    window_pos = starts[:, None] + torch.arange(width, device=device)
    pos = torch.cat([window_pos.repeat(1, num_copies), torch.arange(seq_len, device=device).expand(batch, -1)], 1)
    copies = torch.cat([
        torch.arange(1, num_copies + 1, device=device).repeat_interleave(width),
        torch.zeros(seq_len, device=device, dtype=torch.long),
    ])
    return copies.unsqueeze(0).expand(batch, -1), pos // block_size, pos < lengths[:, None], pos


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
