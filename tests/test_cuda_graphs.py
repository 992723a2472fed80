"""The shape-static block forward behind the engine's CUDA graphs, run eagerly on CPU (tiny models): padded rows and
keys give `forward_chunk`'s logits and cache; the cache keeps its buffers when rows are copied or dropped; the engine
decodes the same tokens through it. The captured graphs themselves are checked in tests/test_gpu_graphs.py."""

from __future__ import annotations

import pytest
import torch

from lrl.models import BlockKVCache, build_tiny_model
from lrl.models.cuda_graphs import BlockForwardGraphs
from lrl.rollout import NativeEngine, SamplingParams


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {shift: build_tiny_model(tiny_tokenizer, block_size=4, seed=3, logit_shift=shift).eval()
            for shift in (False, True)}


def _prefill(lm, cache, full_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(full_lens)
    chunk = torch.randint(5, 90, (len(full_lens), width), generator=g)
    full = torch.tensor(full_lens)
    lm.forward_chunk(cache, chunk, block_size=4, key_valid=torch.arange(width)[None] < full[:, None], store=full)


def test_cache_copies_and_drops_rows_inside_its_buffers():
    cache = BlockKVCache(2, 2, 8, 1, 1, dtype=torch.float32, device="cpu", capacity=6)
    for layer, buf in enumerate(cache.key_buffers):
        buf[:2, :, 0, 0] = torch.tensor([[10.0 + layer], [20.0 + layer]])
    cache.lengths = torch.tensor([3, 5])
    ptrs = [b.data_ptr() for b in cache.key_buffers + cache.value_buffers]
    cache.repeat_interleave(3)
    assert cache.num_rows == 6 and cache.lengths.tolist() == [3, 3, 3, 5, 5, 5]
    assert cache.keys[1][:, 0, 0, 0].tolist() == [11, 11, 11, 21, 21, 21]
    cache.keep_rows(torch.tensor([1, 4, 5]))
    assert cache.num_rows == 3 and cache.lengths.tolist() == [3, 5, 5]
    assert cache.keys[0][:, 0, 0, 0].tolist() == [10, 20, 20] and cache.keys[0].shape == (3, 8, 1, 1)
    assert [b.data_ptr() for b in cache.key_buffers + cache.value_buffers] == ptrs  # nothing reallocated
    cache.reset(4)
    assert cache.lengths.tolist() == [0, 0, 0, 0] and cache.capacity == 6
    with pytest.raises(ValueError, match="capacity"):
        cache.reset(7)
    small = BlockKVCache(1, 2, 8, 1, 1, dtype=torch.float32, device="cpu")  # no spare capacity: reallocates
    small.repeat_interleave(2)
    assert small.num_rows == 4 and small.capacity == 4


def test_buckets():
    lm_cache = BlockKVCache(1, 5, 300, 1, 1, dtype=torch.float32, device="cpu", capacity=12)
    graphs = BlockForwardGraphs(None, lm_cache, block_size=4, kv_step=128)
    assert [graphs.row_bucket(a) for a in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert [graphs.key_bucket(n) for n in (4, 128, 129, 290)] == [128, 128, 256, 300]
    assert not graphs.capture
    with pytest.raises(ValueError, match="kv_step"):
        BlockForwardGraphs(None, lm_cache, block_size=4, kv_step=0)
    with pytest.raises(ValueError, match="CUDA"):
        BlockForwardGraphs(None, lm_cache, block_size=4, capture=True)


@pytest.mark.parametrize("shift", [False, True])
def test_static_forward_matches_forward_chunk(models, shift):
    """Three rows at different lengths, one with a partial budget, padded to 4 rows and 8 keys a step: the same
    logits at every in-budget position as the dense-mask forward, the same committed cache after a store pass,
    and the next forward agrees too. The padding row writes only into a buffer row not in use."""
    lm = models[shift]
    block = torch.tensor([[7, 8, 9, 10], [lm.bd.mask_token_id] * 4, [11, 12, 13, 14]])
    key_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ref = lm.new_cache(3, 24)
    static = lm.new_cache(3, 24, capacity=5)
    for c in (ref, static):
        _prefill(lm, c, [8, 4, 12])
    spare = [b[3:].clone() for b in static.key_buffers]
    graphs = BlockForwardGraphs(lm, static, block_size=4, kv_step=8)
    store = torch.tensor([4, 0, 0])
    lm.decode_attention = "dense"
    want = lm.forward_chunk(ref, block, block_size=4, key_valid=key_valid, store=store)
    got = graphs.forward(block, key_valid=key_valid, store=store)
    torch.testing.assert_close(got[key_valid], want[key_valid], atol=1e-5, rtol=1e-5)
    assert list(graphs.shapes) == [(4, 16)]  # 3 rows -> 4; max start 12 + 4 -> 16 keys
    assert static.lengths.tolist() == ref.lengths.tolist() == [12, 4, 12]
    for layer in range(len(ref.keys)):
        torch.testing.assert_close(static.keys[layer][0, :12], ref.keys[layer][0, :12])
    assert torch.equal(static.key_buffers[0][4:], spare[0][1:])  # row 4 untouched, row 3 took the padding
    nxt = torch.full((3, 4), lm.bd.mask_token_id)
    torch.testing.assert_close(graphs.forward(nxt), lm.forward_chunk(ref, nxt, block_size=4), atol=1e-5, rtol=1e-5)
    assert list(graphs.shapes) == [(4, 16)]  # same bucket, reused


def test_static_forward_declines_other_patterns(models):
    """A budget that is not a prefix of the block, or a chunk other than one block, is left to the dense path."""
    lm = models[False]
    cache = lm.new_cache(2, 16)
    _prefill(lm, cache, [4, 8])
    graphs = BlockForwardGraphs(lm, cache, block_size=4, kv_step=8)
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert graphs.forward(torch.full((2, 4), 5), key_valid=holes) is None
    assert graphs.forward(torch.full((2, 8), 5)) is None
    assert graphs.shapes == {}


def _engine(lm, tok, static: bool):
    engine = NativeEngine(lm, tok)
    engine.cuda_graphs = static  # the CPU stand-in: the same static forwards, run eagerly (no capture off CUDA)
    return engine


def test_engine_decodes_the_same_through_static_forwards(peaky_checkpoint):
    """Greedy threshold decoding with rows finishing at different times (rows dropped mid-run, padding rows):
    the same tokens and step maps as the eager engine; the kept page pool and its shapes serve the next call."""
    from lrl.models import load_checkpoint

    lm, tok = load_checkpoint(peaky_checkpoint)
    lm.eval()
    prompts = [f"Q: {a}+{b}=?\nA: " for a, b in [(12, 7), (3, 40), (99, 1), (5, 5)]] + ["Q: 1+1=?"]
    sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=20, threshold=0.9, samples_per_prompt=2,
                        stop_token_ids=(tok.eos_token_id,))
    eager = _engine(lm, tok, False).generate(prompts, sp)
    engine = _engine(lm, tok, True)
    got = engine.generate(prompts, sp)
    assert got.response_ids == eager.response_ids and got.step_maps == eager.step_maps
    shapes, buffers = dict(engine._graphs.shapes), engine._graphs.cache.key_pools[0].data_ptr()
    assert sorted({rows for rows, _ in shapes}) == [2, 4, 8, 16], shapes  # rows end; padded to powers of two
    again = engine.generate(prompts[:3], sp)  # fewer rows: the kept cache, no new buffers
    assert again.response_ids == eager.response_ids[:6]
    assert engine._graphs.cache.key_pools[0].data_ptr() == buffers
    engine.release_memory()
    assert engine._graphs is None


def test_engine_refuses_cuda_graphs_off_cuda(tiny_lm, tiny_tokenizer):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        NativeEngine(tiny_lm, tiny_tokenizer, cuda_graphs=True)


def test_serve_refuses_cuda_graphs_off_cuda(tiny_checkpoint):
    from lrl.serve import build_app, build_parser

    args = build_parser().parse_args(["--model", str(tiny_checkpoint), "--device", "cpu", "--cuda-graphs"])
    with pytest.raises(SystemExit, match="--cuda-graphs needs a CUDA device, the model is on cpu"):
        build_app(args)
