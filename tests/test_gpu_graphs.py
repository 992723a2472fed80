"""CUDA-graph block forwards (marked ``gpu``, deselected by default). On a GPU machine:
``pytest -o addopts="" -m gpu tests/test_gpu_graphs.py``. The shape-static forward they capture is checked against
`forward_chunk` on CPU in tests/test_cuda_graphs.py; here the captured replay must give what the eager forward gives.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

CUDA = torch.device("cuda")


@pytest.fixture
def bf16_lm(tiny_tokenizer):
    from lrl.models import build_tiny_model

    return build_tiny_model(tiny_tokenizer, block_size=4, seed=1, logit_shift=True).to(CUDA, torch.bfloat16).eval()


def _prefilled(lm, full_lens, capacity, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(full_lens)
    cache = lm.new_cache(len(full_lens), width + 12, capacity=capacity)
    chunk = torch.randint(5, 90, (len(full_lens), width), generator=g).to(CUDA)
    full = torch.tensor(full_lens, device=CUDA)
    lm.decode_attention = "dense"
    lm.forward_chunk(cache, chunk, block_size=4, key_valid=torch.arange(width, device=CUDA)[None] < full[:, None],
                     store=full)
    return cache


def test_replay_matches_eager_and_sees_weight_updates(bf16_lm):
    """The captured forward equals the same forward run eagerly (same kernels), replays with new inputs, and reads
    weights changed in place (the engine's weight sync) without a recapture."""
    from lrl.models.cuda_graphs import BlockForwardGraphs

    lm = bf16_lm
    block = torch.tensor([[7, 8, 9, 10], [lm.bd.mask_token_id] * 4, [11, 12, 13, 14]], device=CUDA)
    key_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool, device=CUDA)
    caches = {c: _prefilled(lm, [8, 4, 12], capacity=5) for c in (True, False)}
    runners = {c: BlockForwardGraphs(lm, cache, block_size=4, kv_step=8, capture=c) for c, cache in caches.items()}
    outs = {c: r.forward(block, key_valid=key_valid) for c, r in runners.items()}
    assert runners[True].shapes[(4, 16)].replays == 1
    torch.testing.assert_close(outs[True][key_valid], outs[False][key_valid], atol=1e-2, rtol=1e-2)
    dense = copy.deepcopy(caches[False])
    lm.decode_attention = "dense"
    want = lm.forward_chunk(dense, block, block_size=4, key_valid=key_valid)
    torch.testing.assert_close(outs[True][key_valid].float(), want[key_valid].float(), atol=6e-2, rtol=6e-2)
    with torch.no_grad():
        for p in lm.model.model.layers[0].mlp.parameters():
            p.mul_(-1.5)
    nxt = torch.full((3, 4), lm.bd.mask_token_id, device=CUDA)
    outs = {c: r.forward(nxt, key_valid=key_valid) for c, r in runners.items()}
    assert runners[True].shapes[(4, 16)].replays == 2 and len(runners[True].shapes) == 1
    torch.testing.assert_close(outs[True][key_valid], outs[False][key_valid], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("schedule", [{}, {"max_rows": 4, "kv_cache_gb": 40 * 4096 / 1e9}],
                         ids=["all-rows", "admitted-and-preempted"])
def test_engine_with_cuda_graphs_matches_eager(peaky_checkpoint, schedule):
    """Greedy fp32 threshold decoding gives the eager engine's tokens and TPF through captured graphs over the page
    pool (also with groups admitted mid-run and rows preempted by a small budget), and the graphs captured by one
    call serve the next."""
    from lrl.models import load_checkpoint
    from lrl.rollout import NativeEngine, SamplingParams

    lm, tok = load_checkpoint(peaky_checkpoint)
    lm = lm.to(CUDA).eval()
    prompts = [f"Q: {a}+{b}=?\nA: " for a, b in [(12, 7), (3, 40), (99, 1), (5, 5), (61, 28)]] + ["Q: 1+1=?"]
    sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=22, threshold=0.9, samples_per_prompt=2,
                        stop_token_ids=(tok.eos_token_id,))
    eager = NativeEngine(lm, tok, **schedule).generate(prompts, sp)
    engine = NativeEngine(lm, tok, cuda_graphs=True, **schedule)
    got = engine.generate(prompts, sp)
    same = sum(a == b for a, b in zip(got.response_ids, eager.response_ids))
    assert same >= len(got.response_ids) - 1, f"{same}/{len(got.response_ids)} rows agree"  # kernels' near-ties
    assert abs(got.batch_tpf - eager.batch_tpf) < 0.5
    shapes = {k: s.replays for k, s in engine._graphs.shapes.items()}
    assert all(s.graph is not None for s in engine._graphs.shapes.values())
    engine.generate(prompts, sp)
    assert set(engine._graphs.shapes) == set(shapes)  # nothing recaptured
    assert sum(s.replays for s in engine._graphs.shapes.values()) > sum(shapes.values())


def test_bench_engine_graphs_on_cuda():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_engine

    res = bench_engine.main(["--shape", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--batches", "1", "4",
                             "--block-size", "4", "--prompt-len", "8", "--max-new-tokens", "8", "--tpf", "2",
                             "--cuda-graphs", "--compare"])
    assert all(r["graphs_block_forward_ms"] > 0 for r in res["forward"])
    assert {(r["rows"], r["static_tpf"], r["cuda_graphs"]) for r in res["engine"]} == {
        (rows, tpf, g) for rows in (1, 4) for tpf in (1, 2) for g in (False, True)}
    assert all(r["tpf"] == r["static_tpf"] for r in res["engine"])
