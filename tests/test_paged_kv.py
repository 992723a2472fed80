"""The paged KV cache and the continuously batched engine over it (issue 27).

The forward over pages equals the dense cache's; the engine's greedy outputs equal those the dense-cache engine
returned (tests/data/engine_golden.json, written by scripts/record_engine_golden.py before the paged engine) under
continuous admission, chunked gathers and sampling, small budgets that preempt rows; sampled rows do not depend on
the other rows of their forwards; pages are returned; a budget too small for one group is one clear error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lrl.models import build_tiny_model
from lrl.models.paged_kv import PagedKVCache
from lrl.rollout import NativeEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from record_engine_golden import CASES, PROMPTS, build  # noqa: E402

GOLDEN = json.loads((ROOT / "tests/data/engine_golden.json").read_text())


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return {kind: build(kind, tiny_tokenizer) for kind in ("plain", "shift")}


def page_bytes(lm, bsz: int) -> int:
    return lm.kv_bytes_per_token() * bsz


# ---------------------------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("kernel", ["dense", "lengths"])
@pytest.mark.parametrize("gather", [None, 40])
def test_paged_forward_equals_dense_cache(tiny_tokenizer, kernel, gather):
    """Prefill rows of different lengths, then one-block forwards at mixed positions (partial budgets, store
    passes): the paged cache's logits equal the dense cache's, with gathers in one piece or in row chunks."""
    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0, logit_shift=True).eval()
    lm.decode_attention = kernel
    full = torch.tensor([8, 0, 4])
    width, rows = 8, 3
    dense = lm.new_cache(rows, 24)
    paged = lm.new_paged_cache(16, 4, max_rows=rows, max_blocks=6, gather_tokens=gather)
    new = paged.add_rows([paged.alloc(int(f) // 4) for f in full])
    ids = torch.randint(4, 90, (rows, width), generator=torch.Generator().manual_seed(0))
    valid = torch.arange(width)[None] < full[:, None]
    lm.forward_chunk(dense, ids, block_size=4, key_valid=valid, store=full)
    lm.forward_chunk(paged, ids, rows=new, block_size=4, key_valid=valid, store=full)
    paged.open_block(torch.arange(rows), paged.lengths // 4)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        block = torch.randint(4, 90, (rows, 4), generator=gen)
        key_valid = torch.ones(rows, 4, dtype=torch.bool)
        key_valid[1, 2:] = step == 3  # row 1's budget ends mid-block until its store pass
        store = torch.tensor([4, 4 * (step % 2), 0]) if step in (1, 3) else None
        want = lm.forward_chunk(dense, block, block_size=4, key_valid=key_valid, store=store)
        got = lm.forward_chunk(paged, block, block_size=4, key_valid=key_valid, store=store)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if store is not None:
            opening = (store > 0).nonzero().squeeze(1)
            paged.open_block(opening, paged.lengths[opening] // 4)
    assert torch.equal(paged.lengths, dense.lengths)


def test_pages_are_shared_returned_and_scratch_stays_unowned():
    c = PagedKVCache(1, 9, 4, 1, 2, max_rows=6, max_blocks=4, dtype=torch.float32, device="cpu")
    assert c.free_pages == 8 and c.used_pages == 0
    rows = c.add_rows([c.alloc(2), c.alloc(1)])  # two prompts: 2 and 1 full blocks
    c.expand_rows(rows, [3, 2])  # their samples share them
    assert c.num_rows == 5 and c.used_pages == 3
    assert c.table[:5, :2].tolist() == [[1, 2], [1, 2], [1, 2], [3, 0], [3, 0]]
    c.open_block(torch.arange(5), torch.tensor([2, 2, 2, 1, 1]))  # each sample's private first block
    assert c.used_pages == 8 and c.free_pages == 0
    c.keep_rows(torch.tensor([0, 3]))  # shared pages stay while a sample holds them; private ones return
    assert c.used_pages == 5 and sorted(p for r in c.row_pages(torch.arange(2)) for p in r) == [1, 2, 3, 4, 7]
    assert c.table[2:].eq(0).all()  # rows past those in use hold only the scratch page
    c.reset()
    assert c.free_pages == 8 and c.num_rows == 0
    with pytest.raises(RuntimeError, match="9 pages asked, 8 free"):
        c.alloc(9)


# ---------------------------------------------------------------------------------------------- the engine
ENGINES = {
    "default": dict(),
    "continuous-3-rows": dict(max_rows=3),
    "continuous-5-rows-groups-in-parts": dict(max_rows=5),
    "chunks-of-4-rows": dict(max_rows=4, continuous=False),
    "tight-budget-preempts": dict(max_rows=12, kv_cache_gb=21 * 8192 / 1e9),
    "tiny-transients": dict(transient_gb=1e-6),
}


@pytest.mark.parametrize("setup", list(ENGINES))
@pytest.mark.parametrize("kind", ["plain", "shift"])
def test_greedy_outputs_equal_the_dense_engine(models, tiny_tokenizer, kind, setup):
    """Every golden case (strategies, planner, stops mid-block under both EOS policies, G = 3, prompts of different
    lengths finishing at different times) under each schedule: tokens, step maps, store passes, tails exact;
    sampling and planner log-probs to float rounding (logits are now computed only at masked positions)."""
    eng = NativeEngine(models[kind], tiny_tokenizer, **ENGINES[setup])
    preempted = parts = 0
    for name, kw in CASES.items():
        b = eng.generate(PROMPTS, SamplingParams(greedy=True, **kw))
        want = GOLDEN["outputs"][f"{kind}/{name}"]
        assert b.response_ids == want["response_ids"], name
        assert b.step_maps == want["step_maps"], name
        assert b.num_forwards.tolist() == want["num_forwards"], name
        assert b.num_store_passes.tolist() == want["num_store_passes"], name
        assert b.finish_reasons == want["finish_reasons"], name
        assert b.tail_ids == want["tail_ids"] and b.tail_step_maps == want["tail_step_maps"], name
        for got, ref in zip(b.sampling_logprobs, want["sampling_logprobs"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
        if want["planner_logprobs"] is not None:
            for got, ref in zip(b.planner_logprobs, want["planner_logprobs"]):
                torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
        preempted += eng.stats.preempted_rows
        if setup.startswith("continuous"):
            assert len(eng.stats.admitted_at) > 1 and max(eng.stats.rows) <= eng.max_rows
            parts += eng.stats.partial_admissions
    if setup == "continuous-5-rows-groups-in-parts":
        assert parts > 0
    if setup == "tight-budget-preempts":
        assert preempted > 0  # the budget did force restarts, and they changed nothing
        assert max(eng.stats.pages_used) <= eng.stats.pool_pages


SAMPLED = SamplingParams(block_size=4, threshold=0.05, temperature=0.7, top_p=0.95, max_new_tokens=20,
                         samples_per_prompt=3, seed=11, stop_token_ids=(79, 8))


def test_a_groups_samples_do_not_depend_on_the_other_groups(models, tiny_tokenizer):
    """Sampled rollouts: a group alone, among others (admitted mid-run with 3 rows per forward), under a budget that
    preempts it, and in the old chunked schedule give the same tokens, step maps and log-probs (to float rounding:
    the row count of a matmul moves its last bit)."""
    lm = models["plain"]
    together = NativeEngine(lm, tiny_tokenizer).generate(PROMPTS, SAMPLED)
    assert len({tuple(r) for r in together.response_ids[:3]}) > 1  # the samples of a group do differ
    for kw in (dict(max_rows=3), dict(max_rows=21, kv_cache_gb=36 * 4096 / 1e9), dict(max_rows=6, continuous=False)):
        eng = NativeEngine(lm, tiny_tokenizer, **kw)
        again = eng.generate(PROMPTS, SAMPLED)
        if "kv_cache_gb" in kw:
            assert eng.stats.preempted_rows > 0
        assert again.response_ids == together.response_ids, kw
        assert again.step_maps == together.step_maps, kw
        for got, ref in zip(again.sampling_logprobs, together.sampling_logprobs):  # batch size moves the last bit
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-5, rtol=0)
    # group 2 decoded without the others: the same three samples when it is row block 2 of the request
    alone = NativeEngine(lm, tiny_tokenizer).generate(PROMPTS[:3], SAMPLED)
    assert alone.response_ids[6:9] == together.response_ids[6:9]


def test_budget_too_small_for_one_response_is_one_line_naming_the_knob(models, tiny_tokenizer):
    """The longest prompt (66 tokens) + 20 new tokens at block 4: 22 pages and the scratch page; 22 do not do."""
    eng = NativeEngine(models["plain"], tiny_tokenizer, kv_cache_gb=22 * 4096 / 1e9)
    knob = r"raise data\.init_args\.rollout\.kv_cache_gb"
    with pytest.raises(ValueError, match=r"one response .* needs 9.42e-05 GB .* " + knob) as e:
        eng.generate(PROMPTS, SAMPLED)
    assert "\n" not in str(e.value)
    NativeEngine(models["plain"], tiny_tokenizer, kv_cache_gb=23 * 4096 / 1e9).generate(PROMPTS, SAMPLED)  # fits
    for bad in (dict(kv_cache_gb=0), dict(kv_cache_gb=-1.0), dict(transient_gb=0)):
        with pytest.raises(ValueError, match="must be > 0"):
            NativeEngine(models["plain"], tiny_tokenizer, **bad)


def test_pages_return_over_100_rollouts(models, tiny_tokenizer):
    """No leak: after every call of a kept pool (as with CUDA graphs) every page is free again."""
    eng = NativeEngine(models["plain"], tiny_tokenizer, max_rows=4, kv_cache_gb=60 * 4096 / 1e9)
    cache, _ = eng._pool([len(p) for p in eng.encode(PROMPTS)], SAMPLED)
    for i in range(100):
        sp = SamplingParams(block_size=4, threshold=0.05, temperature=1.0, max_new_tokens=8 + i % 9,
                            samples_per_prompt=1 + i % 3, seed=i, stop_token_ids=(79,))
        eng._pool = lambda lens, sp, c=cache: (c.reset() or c, c.num_pages - 1)
        eng.generate(PROMPTS[i % 4 : i % 4 + 3], sp)
        assert cache.num_rows == 0 and cache.used_pages == 0, i
        assert cache.table.eq(0).all()


def test_stats_track_rows_pages_and_tokens(models, tiny_tokenizer):
    """Tokens held never exceed the pages' slots, and the pages exceed the tokens by at most a block per row."""
    eng = NativeEngine(models["plain"], tiny_tokenizer, max_rows=6, record_tokens=True)
    eng.generate(PROMPTS, SAMPLED)
    s = eng.stats
    assert len(s.rows) == len(s.pages_used) == len(s.tokens_held) > 0
    for rows, pages, held in zip(s.rows, s.pages_used, s.tokens_held):
        assert held <= pages * s.page_size
    assert s.peak_kv_bytes == s.peak_pages * s.page_bytes
    assert s.as_dict()["iterations"] == len(s.rows)


def test_rollout_memory_is_released_after_a_call(models, tiny_tokenizer, monkeypatch):
    """Phase switching: the eager engine's page pool lives only for its call (nothing held into training); the
    engine's figures of that call are still there to log."""
    import gc
    import weakref

    lm = models["plain"]
    eng = NativeEngine(lm, tiny_tokenizer, kv_cache_gb=60 * 4096 / 1e9)
    pools = []
    real = lm.new_paged_cache

    def spy(*a, **kw):
        cache = real(*a, **kw)
        pools.append(weakref.ref(cache))
        return cache

    monkeypatch.setattr(lm, "new_paged_cache", spy)
    eng.generate(PROMPTS[:3], SAMPLED)
    gc.collect()
    assert len(pools) == 1 and pools[0]() is None
    stats = eng.last_stats()
    assert stats["rollout/kv_pool_gb"] == pytest.approx(59 * 4096 / 1e9)  # the budget, less the scratch page
    assert 0 < stats["rollout/kv_peak_gb"] <= stats["rollout/kv_pool_gb"]
    assert stats["rollout/rows_per_forward"] <= 9


def test_serve_takes_the_kv_budget_and_refuses_a_bad_one(tiny_checkpoint):
    from lrl.serve import build_app, build_parser

    parse = build_parser().parse_args
    app = build_app(parse(["--model", str(tiny_checkpoint), "--device", "cpu", "--kv-cache-gb", "0.001"]))
    assert app.state.lrl.engine.kv_cache_gb == 0.001
    for flag in ("--kv-cache-gb", "--transient-gb"):
        with pytest.raises(SystemExit, match=f"{flag} must be > 0, got 0.0"):
            build_app(parse(["--model", str(tiny_checkpoint), "--device", "cpu", flag, "0"]))


def test_offloaded_weight_copy_takes_updates_and_decodes_the_same(tiny_tokenizer):
    """``offload_weights``: release, a weight update while released, and the next generate compose (on this CPU-only
    box the move itself is to the device it is already on; tests/test_gpu_graphs.py-style GPU runs cover CUDA)."""
    import copy

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0).eval()
    eng = NativeEngine(copy.deepcopy(lm), tiny_tokenizer, offload_weights=True)
    sp = SamplingParams(block_size=4, greedy=True, threshold=0.9, max_new_tokens=12)
    before = eng.generate(PROMPTS[:2], sp)
    eng.release_memory()
    assert eng.lm.device.type == "cpu"
    eng.update_weights({k: v for k, v in lm.model.state_dict().items()}, version=3)
    again = eng.generate(PROMPTS[:2], sp)
    assert again.response_ids == before.response_ids and again.weight_version == 3
