"""The model layer: training forward vs a slow per-block reference, cached decoding vs full forwards, I/O."""

from __future__ import annotations

import json

import pytest
import torch

from lrl.models import BlockDiffusionConfig, build_tiny_model, load_checkpoint, save_checkpoint


def _slow_block_logits(lm, x, masked, length, bs):
    """For each block, a separate forward over [clean earlier blocks | noisy block]; logits at masked positions."""
    out = []
    for start in range(0, length, bs):
        end = min(start + bs, length)
        if not masked[start:end].any():
            continue
        seq = x[:end].clone()
        seq[start:end] = torch.where(masked[start:end], torch.tensor(lm.bd.mask_token_id), seq[start:end])
        logits = lm.full_logits(seq[None], torch.tensor([end]), bs)[0]
        out.append(logits[start:end][masked[start:end]])
    return torch.cat(out)


@pytest.mark.parametrize("bs", [1, 4, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_doubled_sequence_matches_per_block_forwards(tiny_lm, bs, padded):
    g = torch.Generator().manual_seed(bs)
    b, length = 3, 19
    x = torch.randint(4, 100, (b, length), generator=g)
    lengths = torch.tensor([19, 13, 6]) if padded else torch.full((b,), length)
    masked = torch.rand(b, length, generator=g) < 0.5
    masked &= torch.arange(length)[None] < lengths[:, None]
    x = torch.where(torch.arange(length)[None] < lengths[:, None], x, torch.tensor(1))  # pad id
    with torch.no_grad():
        fast = tiny_lm.diffusion_logits(x, masked[:, None], lengths, block_size=bs)
    slow = torch.cat([_slow_block_logits(tiny_lm, x[i], masked[i], int(lengths[i]), bs) for i in range(b)])
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_packed_noisy_copies_equal_separate_forwards(tiny_lm):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(4, 100, (2, 16), generator=g)
    lengths = torch.tensor([16, 11])
    masks = torch.rand(2, 3, 16, generator=g) < 0.4
    masks &= torch.arange(16)[None, None] < lengths[:, None, None]
    with torch.no_grad():
        packed = tiny_lm.diffusion_logits(x, masks, lengths)
        b_idx, k_idx, _ = masks.nonzero(as_tuple=True)
        for k in range(3):
            single = tiny_lm.diffusion_logits(x, masks[:, k : k + 1], lengths)
            # packed rows are in (b, k, l) order; pick those of copy k
            torch.testing.assert_close(packed[k_idx == k], single, atol=1e-4, rtol=1e-4)
    assert b_idx.numel() == packed.shape[0]


def test_training_forward_has_gradients(tiny_lm):
    x = torch.randint(4, 100, (2, 8))
    masks = torch.ones(2, 1, 8, dtype=torch.bool)
    logits = tiny_lm.diffusion_logits(x, masks, torch.tensor([8, 8]))
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in tiny_lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_lm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shift", [False, True])
def test_cached_block_decoding_matches_uncached(tiny_tokenizer, shift):
    """Prefill + block forwards + store passes == full forwards with the block-causal mask."""
    lm = build_tiny_model(tiny_tokenizer, block_size=4, logit_shift=shift, seed=1).eval()
    bs, g = 4, torch.Generator().manual_seed(3)
    prompt_lens = [9, 4, 14]
    total = 32
    seqs = torch.randint(4, 100, (3, total), generator=g)
    cache = lm.new_cache(3, 40)
    full_blocks = torch.tensor([p // bs * bs for p in prompt_lens])
    width = int(full_blocks.max())
    lm.forward_chunk(
        cache,
        seqs[:, :width],
        block_size=bs,
        key_valid=torch.arange(width)[None] < full_blocks[:, None],
        store=full_blocks,
    )
    assert cache.lengths.tolist() == full_blocks.tolist()
    for _ in range(3):  # three blocks per row, each: a noisy forward (not stored), then a store pass
        starts = cache.lengths.clone()
        idx = starts[:, None] + torch.arange(bs)
        block = torch.gather(seqs, 1, idx)
        noisy = torch.where(torch.rand(3, bs, generator=g) < 0.5, torch.tensor(lm.bd.mask_token_id), block)
        got = lm.forward_chunk(cache, noisy, block_size=bs)
        for r in range(3):
            end = int(starts[r]) + bs
            ref_seq = seqs[r, :end].clone()
            ref_seq[int(starts[r]) : end] = noisy[r]
            ref = lm.full_logits(ref_seq[None], torch.tensor([end]), bs)[0, int(starts[r]) : end]
            torch.testing.assert_close(got[r], ref, atol=1e-4, rtol=1e-4)
        lm.forward_chunk(cache, block, block_size=bs, store=torch.full((3,), bs))
    # a subset of rows against the same cache
    rows = torch.tensor([2, 0])
    starts = cache.lengths[rows]
    block = torch.stack([seqs[r, int(s) : int(s) + bs] for r, s in zip(rows.tolist(), starts.tolist())])
    got = lm.forward_chunk(cache, block, rows=rows, block_size=bs)
    for i, r in enumerate(rows.tolist()):
        end = int(starts[i]) + bs
        ref = lm.full_logits(seqs[r, :end][None], torch.tensor([end]), bs)[0, int(starts[i]) : end]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(tiny_lm, tiny_tokenizer, tiny_checkpoint, tmp_path):
    lm, tok = load_checkpoint(tiny_checkpoint)
    assert lm.bd == tiny_lm.bd
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["architectures"] == ["SDARForCausalLM"]
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == tiny_tokenizer.mask_token_id
    text = "Q: 12+7=?\nA: \\boxed{19}"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.mask_token_id == tiny_tokenizer.mask_token_id and tok.eos_token_id == tiny_tokenizer.eos_token_id
    x = torch.randint(4, 100, (1, 8))
    m = torch.ones(1, 1, 8, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            lm.diffusion_logits(x, m, torch.tensor([8])), tiny_lm.diffusion_logits(x, m, torch.tensor([8]))
        )
    # saving again keeps the identity (including auto_map) and leaves no temp dirs behind
    lm.identity["auto_map"] = {"AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"}
    save_checkpoint(lm, tmp_path / "again", tokenizer=tok)
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


def test_sdar_style_config_loads(tiny_checkpoint, tmp_path):
    """An official SDAR config.json: model_type sdar, auto_map, no block_size / mask_token_id."""
    import shutil

    d = tmp_path / "sdar"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["block_size"], cfg["mask_token_id"]
    cfg["auto_map"] = {"AutoConfig": "configuration_sdar.SDARConfig"}
    (d / "config.json").write_text(json.dumps(cfg))
    lm, tok = load_checkpoint(d)
    assert lm.bd.block_size == 4  # SDAR's fallback
    assert lm.bd.mask_token_id == tok.mask_token_id  # from the tokenizer
    assert lm.bd.logit_shift is False
    lm2, _ = load_checkpoint(d, block_size=32)
    assert lm2.bd.block_size == 32


def test_missing_or_conflicting_mask_token_is_a_clear_error(tiny_checkpoint, tmp_path):
    import shutil

    from lrl.models import resolve_block_diffusion_config

    d = tmp_path / "nomask"
    shutil.copytree(tiny_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["mask_token_id"]
    (d / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg.pop("mask_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    # no declared mask token, but a <|MASK|> token in the vocabulary (as SDAR's tokenizers): that is the mask
    lm, tok = load_checkpoint(d)
    assert tok.mask_token_id is None and lm.bd.mask_token_id == tok.convert_tokens_to_ids("<|MASK|>") == 2

    class NoMask:
        mask_token_id = None

        def get_vocab(self):
            return {"a": 0, "<|MASK|>x": 1}

        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="no mask token"):
        resolve_block_diffusion_config({"vocab_size": 100}, NoMask())

    class Tok:
        mask_token, mask_token_id = "<m>", 5

        def __len__(self):
            return 100

    with pytest.raises(ValueError, match="mask token mismatch"):
        resolve_block_diffusion_config({"mask_token_id": 2, "vocab_size": 100}, Tok())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        resolve_block_diffusion_config({"mask_token_id": 200, "vocab_size": 100})
    with pytest.raises(ValueError, match="block_size"):
        BlockDiffusionConfig(mask_token_id=1, block_size=0)


def test_flex_block_mask_matches_dense_mask():
    """The flex_attention BlockMask encodes the same rules as the dense SDPA mask (checked densely on CPU)."""
    from lrl.models.masks import dense_block_diffusion_mask, flex_block_diffusion_mask, segment_ids

    copy, block, valid, _ = segment_ids(torch.tensor([10, 7]), 10, 2, 4)
    dense = dense_block_diffusion_mask(copy, block, valid)[:, 0]
    bm = flex_block_diffusion_mask(copy, block, valid)
    b, s = copy.shape
    q = torch.arange(s)[:, None].expand(s, s)
    k = torch.arange(s)[None, :].expand(s, s)
    for i in range(b):
        got = bm.mask_mod(torch.tensor(i), torch.tensor(0), q, k)
        assert torch.equal(got, dense[i])
    # spot-check the rules by hand: noisy copy 1 token 5 (block 1) sees clean block 0, not clean block 1
    clean0, clean5 = 20 + 0, 20 + 5
    assert dense[0, 5, clean0] and not dense[0, 5, clean5]
    assert not dense[0, clean0, 5]  # clean never sees noisy
    assert not dense[0, 5, 10 + 5]  # noisy copy 1 never sees noisy copy 2
    assert not dense[1, 0, 8] and not dense[1, 3, 20 + 8]  # padding (row 1 has 7 tokens)


def test_noisy_window_skips_unmasked_prefix(tiny_lm):
    """Each row's noisy copies start at its own first masked block (same logits as full-length copies)."""
    from lrl.models.masks import dense_block_diffusion_mask, segment_ids

    g = torch.Generator().manual_seed(11)
    x = torch.randint(4, 100, (2, 24), generator=g)
    lengths = torch.tensor([24, 21])
    masks = torch.zeros(2, 2, 24, dtype=torch.bool)
    masks[0, 0, 13:20] = True
    masks[1, 1, 17:21] = True
    with torch.no_grad():
        hidden, starts, width = tiny_lm.diffusion_hidden(x, masks, lengths)
        # row 0: first masked block [12, 16), window 12..23; row 1: [16, 20), window 16..27 (22..27 padding)
        assert starts.tolist() == [12, 16] and width == 12 and hidden.shape[1] == 2 * 12 + 24
        fast = tiny_lm.diffusion_logits(x, masks, lengths)
        # reference: the same packing without the window (full-length noisy copies), computed by hand
        k, length = 2, 24
        noisy = torch.where(masks, torch.tensor(tiny_lm.bd.mask_token_id), x.unsqueeze(1))
        packed = torch.cat([noisy.reshape(2, k * length), x], dim=1)
        copy, block, valid, pos = segment_ids(lengths, length, k, tiny_lm.bd.block_size)
        full = tiny_lm._decoder(packed, pos, dense_block_diffusion_mask(copy, block, valid))
        b_idx, k_idx, l_idx = masks.nonzero(as_tuple=True)
        ref = tiny_lm.logits(full[b_idx, k_idx * length + l_idx])
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
