"""CUDA checks of the engine's key-length attention (marked ``gpu``, deselected by default). On a GPU machine:
``pytest -o addopts="" -m gpu tests/test_gpu_decode_attention.py``.

Speed is checked without timing: the equal-rows forward must run on SDPA's flash kernel alone (SDPA raises when
the forced backend cannot take the call, e.g. because a mask is passed); the measured figures come from
`scripts/bench_engine.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

CUDA = torch.device("cuda")


def _prefilled(lm, full_lens, bsz=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(full_lens)
    cache = lm.new_cache(len(full_lens), width + 3 * bsz)
    chunk = torch.randint(5, 90, (len(full_lens), width), generator=g).to(CUDA)
    full = torch.tensor(full_lens, device=CUDA)
    valid = torch.arange(width, device=CUDA)[None] < full[:, None]
    lm.decode_attention = "dense"
    lm.forward_chunk(cache, chunk, block_size=bsz, key_valid=valid, store=full)
    return cache


def _block(lm, cache, kernel, block, key_valid=None):
    lm.decode_attention = kernel
    return lm.forward_chunk(cache, block, block_size=4, key_valid=key_valid)


@pytest.fixture(scope="module")
def bf16_lm(tiny_tokenizer):
    from lrl.models import build_tiny_model

    return build_tiny_model(tiny_tokenizer, block_size=4, seed=1, logit_shift=True).to(CUDA, torch.bfloat16).eval()


def test_equal_rows_run_on_flash_and_match_dense(bf16_lm):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    lm = bf16_lm
    block = torch.full((3, 4), lm.bd.mask_token_id, device=CUDA)
    caches = {k: _prefilled(lm, [8, 8, 8]) for k in ("dense", "lengths")}
    dense = _block(lm, caches["dense"], "dense", block)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        fast = _block(lm, caches["lengths"], "lengths", block)
    torch.testing.assert_close(fast.float(), dense.float(), atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("kernel", ["lengths", "flex"])
def test_mixed_rows_match_dense(bf16_lm, kernel):
    lm = bf16_lm
    block = torch.tensor([[7, 8, 9, 10], [lm.bd.mask_token_id] * 4, [11, 12, 13, 14]], device=CUDA)
    key_valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool, device=CUDA)
    caches = {k: _prefilled(lm, [8, 4, 12]) for k in ("dense", kernel)}
    outs = {k: _block(lm, c, k, block, key_valid) for k, c in caches.items()}
    torch.testing.assert_close(outs[kernel][key_valid].float(), outs["dense"][key_valid].float(), atol=6e-2,
                               rtol=6e-2)


def test_engine_auto_attention_matches_dense_on_cuda(peaky_checkpoint):
    """Greedy fp32 decoding: the automatic CUDA choice (key lengths) gives the dense mask's tokens and TPF."""
    from lrl.models import load_checkpoint
    from lrl.rollout import NativeEngine, SamplingParams

    lm, tok = load_checkpoint(peaky_checkpoint)
    lm = lm.to(CUDA).eval()
    dense_lm = copy.deepcopy(lm)
    dense_lm.decode_attention = "dense"
    prompts = [f"Q: {a}+{b}=?\nA: " for a, b in [(12, 7), (3, 40), (99, 1), (5, 5), (61, 28), (7, 70)]]
    sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=22, threshold=0.9, samples_per_prompt=2,
                        stop_token_ids=(tok.eos_token_id,))
    auto = NativeEngine(lm, tok).generate(prompts, sp)
    dense = NativeEngine(dense_lm, tok).generate(prompts, sp)
    same = sum(a == b for a, b in zip(auto.response_ids, dense.response_ids))
    assert same >= len(auto.response_ids) - 1, f"{same}/{len(auto.response_ids)} rows agree"  # kernels' near-ties
    assert abs(auto.batch_tpf - dense.batch_tpf) < 0.5


def test_bench_scripts_run_on_cuda(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_engine
    import bench_rl_step

    res = bench_engine.main(["--shape", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--batches", "1", "4",
                             "--block-size", "4", "--prompt-len", "8", "--max-new-tokens", "8", "--tpf", "2"])
    assert [r["tpf"] for r in res["engine"]] == [1.0, 2.0, 1.0, 2.0]
    step = bench_rl_step.main(["--shape", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--prompts", "2",
                               "--samples", "2", "--prompt-len", "8", "--max-new-tokens", "8", "--block-size", "4",
                               "--tpf", "2"])
    assert step["engine_matches_policy"] and step["peak_mem_gib"] >= 0
