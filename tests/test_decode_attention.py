"""Key-length attention of the engine's one-block forwards agrees with the dense boolean mask (CPU; tiny model)."""

from __future__ import annotations

import pytest
import torch

from lrl.models import build_tiny_model
from lrl.models import decode_attention as kvl
from lrl.rollout import NativeEngine, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PROMPTS = ["Q: 12+7=?\nA: ", "hi", "The quick brown fox", "abcdefgh", "x=3; y=x*x; print(y)"]


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {shift: build_tiny_model(tiny_tokenizer, block_size=4, seed=3, logit_shift=shift).eval()
            for shift in (False, True)}


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record the attn_mask of every SDPA call made by the key-length attention."""
    calls = []
    real = kvl._sdpa

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kvl, "_sdpa", spy)
    return calls


def _prefilled(lm, full_lens, bsz=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(full_lens)
    cache = lm.new_cache(len(full_lens), width + 3 * bsz)
    chunk = torch.randint(5, 90, (len(full_lens), width), generator=g)
    full = torch.tensor(full_lens)
    valid = torch.arange(width)[None] < full[:, None]
    lm.forward_chunk(cache, chunk, block_size=bsz, key_valid=valid, store=full)
    return cache


def _block(lm, cache, kernel, block, key_valid, store=None, rows=None):
    lm.decode_attention = kernel
    try:
        return lm.forward_chunk(cache, block, rows=rows, block_size=4, key_valid=key_valid, store=store)
    finally:
        lm.decode_attention = "auto"


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("kernel", ["lengths", "flex"])
def test_block_forward_matches_dense_mask(models, kernel, shift, sdpa_calls):
    """Rows at different cache lengths, some with a partial budget: same logits at every in-budget position, and
    the cache written by a store pass is the same (the next forward agrees too)."""
    lm = models[shift]
    block = torch.tensor([[7, 8, 9, 10], [lm.bd.mask_token_id] * 4, [11, 12, 13, 14]])
    key_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    caches = {k: _prefilled(lm, [8, 4, 12]) for k in ("dense", kernel)}
    store = torch.tensor([4, 0, 0])
    outs = {k: _block(lm, c, k, block, key_valid, store) for k, c in caches.items()}
    if kernel == "lengths":
        assert len(sdpa_calls) == lm.hf_config.num_hidden_layers  # it ran, with a key-padding mask
        assert sdpa_calls[0].shape == (3, 1, 1, 16) and sdpa_calls[0][:, 0, 0].sum(1).tolist() == [12, 6, 13]
    ok = key_valid
    torch.testing.assert_close(outs[kernel][ok], outs["dense"][ok], atol=1e-5, rtol=1e-5)
    assert caches[kernel].lengths.tolist() == caches["dense"].lengths.tolist() == [12, 4, 12]
    nxt = {k: _block(lm, c, k, block, torch.ones(3, 4, dtype=torch.bool)) for k, c in caches.items()}
    torch.testing.assert_close(nxt[kernel], nxt["dense"], atol=1e-5, rtol=1e-5)


def test_equal_rows_use_sdpa_without_mask(models, sdpa_calls):
    """Rows at the same position and in budget read every key: no mask at all (the flash-eligible call)."""
    lm = models[False]
    block = torch.full((2, 4), lm.bd.mask_token_id)
    caches = {k: _prefilled(lm, [8, 8], seed=1) for k in ("dense", "lengths")}
    rows = torch.tensor([1, 0])
    outs = {k: _block(lm, c, k, block, None, rows=rows) for k, c in caches.items()}
    assert sdpa_calls == [None] * lm.hf_config.num_hidden_layers
    torch.testing.assert_close(outs["lengths"], outs["dense"], atol=1e-5, rtol=1e-5)


def test_patterns_a_length_cannot_express_keep_the_dense_mask(models, sdpa_calls):
    """A chunk of two blocks (prefill), or one whose valid positions are not a prefix, falls back to the mask."""
    lm = models[False]
    two_blocks = torch.randint(5, 90, (2, 8))
    gap = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    for chunk, kv in ((two_blocks, None), (two_blocks[:, :4], gap)):
        caches = {k: _prefilled(lm, [4, 8], seed=2) for k in ("dense", "lengths")}
        outs = {k: _block(lm, c, k, chunk, kv) for k, c in caches.items()}
        torch.testing.assert_close(outs["lengths"], outs["dense"], atol=0, rtol=0)
    assert sdpa_calls == []
    starts = torch.tensor([4, 6, 8])
    lens = kvl.block_kv_lengths(starts, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]]).bool(), 4)
    assert lens.tolist() == [6, -1, -1]  # unaligned start; not a prefix


@pytest.mark.parametrize("kernel", ["lengths", "flex"])
def test_engine_matches_dense_mask(models, tiny_tokenizer, kernel):
    """Sampled decoding with mixed prompt lengths and partial final blocks: same tokens, step maps, log-probs."""
    lm = models[True]
    sp = SamplingParams(block_size=4, temperature=0.3, max_new_tokens=14, threshold=0.05, samples_per_prompt=2,
                        seed=5)
    out = {}
    for k in ("dense", kernel):
        lm.decode_attention = k
        out[k] = NativeEngine(lm, tiny_tokenizer).generate(PROMPTS, sp)
    lm.decode_attention = "auto"
    assert out[kernel].response_ids == out["dense"].response_ids
    assert out[kernel].step_maps == out["dense"].step_maps
    assert len(set(map(len, out["dense"].response_ids))) > 1 or max(map(max, out["dense"].step_maps)) > 1
    lps = [torch.tensor([x for r in b.sampling_logprobs for x in r]) for b in (out[kernel], out["dense"])]
    torch.testing.assert_close(lps[0], lps[1], atol=1e-5, rtol=0)


def test_auto_is_key_lengths_on_cuda_and_the_dense_mask_on_cpu(models, sdpa_calls):
    assert kvl.resolve_kernel("auto", torch.device("cuda")) == "lengths"
    assert kvl.resolve_kernel("auto", torch.device("cpu")) == "dense"
    assert kvl.resolve_kernel("flex", torch.device("cpu")) == "flex"
    lm = models[False]
    _block(lm, _prefilled(lm, [8, 8]), "auto", torch.full((2, 4), lm.bd.mask_token_id), None)
    assert sdpa_calls == []


def test_bad_kernel_name_is_rejected(tiny_tokenizer):
    from lrl.models import BlockDiffusionLM

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        BlockDiffusionLM(lm.model, lm.bd, decode_attention="flash")
