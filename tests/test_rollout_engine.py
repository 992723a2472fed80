"""The native rollout engine: step maps and TPF, batching, KV cache, sampling seeds, stopping, errors, weights.

Every test uses the random tiny model (block sizes 4–8, short budgets), so the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from decode_reference import reference_decode  # noqa: E402  (tests/ is on sys.path)

from lrl.models import build_tiny_model
from lrl.rollout import NativeEngine, SamplingParams

PROMPTS = ["Q: 12+7=?\nA: ", "hi", "The quick brown fox", "abcdefgh", "x=3; y=x*x; print(y)"]
# The random tiny model is nearly uniform over ~100 tokens: greedy confidences sit around 0.01-0.03, so thresholds
# of ~0.02 (greedy) or a low temperature (sampling) give a mix of one- and multi-token steps.


@pytest.fixture(scope="module")
def engine(tiny_lm, tiny_tokenizer):
    return NativeEngine(tiny_lm, tiny_tokenizer)


def greedy(**kw) -> SamplingParams:
    kw.setdefault("block_size", 4)
    kw.setdefault("max_new_tokens", 16)
    return SamplingParams(greedy=True, **kw)


def blocks_touched(plen: int, n: int, bsz: int) -> int:
    """Blocks holding generated positions [plen, plen + n)."""
    return (plen + n - 1) // bsz - plen // bsz + 1


# ---------------------------------------------------------------------------------------------- step maps, TPF
@pytest.mark.parametrize("sp", [
    greedy(threshold=1.0),
    greedy(remasking_strategy="low_confidence_static", denoising_steps=4),
    greedy(remasking_strategy="sequential", denoising_steps=8, block_size=8),
], ids=["dynamic-1.0", "static-B-steps", "sequential-B-steps"])
def test_one_token_per_forward(engine, sp):
    out = engine.generate(PROMPTS, sp)
    for ids, sm, nf in zip(out.response_ids, out.step_maps, out.num_forwards.tolist()):
        assert len(ids) == sp.max_new_tokens
        assert sorted(sm) == list(range(1, len(ids) + 1))
        assert nf == len(ids)
    assert torch.equal(out.tpf, torch.ones(len(out)))
    assert out.batch_tpf == 1.0


@pytest.mark.parametrize("bsz", [4, 8])
def test_threshold_zero_decodes_each_block_in_one_forward(engine, tiny_tokenizer, bsz):
    out = engine.generate(PROMPTS, greedy(threshold=0.0, block_size=bsz, max_new_tokens=13))
    for prompt, ids, sm, nf in zip(out.prompt_ids, out.response_ids, out.step_maps, out.num_forwards.tolist()):
        plen = len(prompt)
        nb = blocks_touched(plen, len(ids), bsz)
        assert nf == nb
        assert sm == [(plen + i) // bsz - plen // bsz + 1 for i in range(len(ids))]


@pytest.mark.parametrize("sp", [
    SamplingParams(block_size=4, threshold=0.05, temperature=0.1, max_new_tokens=24, seed=1),
    SamplingParams(block_size=8, threshold=0.02, temperature=0.2, top_k=20, max_new_tokens=20, seed=2,
                   samples_per_prompt=2),
    greedy(threshold=0.018, block_size=8, max_new_tokens=20),
    greedy(threshold=0.9, block_size=4, max_new_tokens=15),
])
def test_step_map_consistent_with_forwards_and_store_passes(engine, sp):
    out = engine.generate(PROMPTS, sp)
    if sp.threshold < 0.5:
        assert out.batch_tpf > 1.2  # multi-token steps do happen
    bsz = sp.block_size
    for prompt, ids, sm, nf, ns in zip(out.prompt_ids, out.response_ids, out.step_maps, out.num_forwards.tolist(),
                                       out.num_store_passes.tolist()):
        plen = len(prompt)
        assert len(sm) == len(ids) == sp.max_new_tokens and min(sm) >= 1
        assert set(sm) == set(range(1, nf + 1))  # no stop ids: every denoising forward left a token
        by_block: dict[int, list[int]] = {}
        for i, s in enumerate(sm):
            by_block.setdefault((plen + i) // bsz, []).append(s)
        blocks = sorted(by_block)
        for a, b in zip(blocks, blocks[1:]):
            assert max(by_block[a]) < min(by_block[b])
        assert ns == len(blocks) - 1  # every block but the last is committed by a store pass
    assert out.finish_reasons == ["length"] * len(out)


# ---------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("sp", [greedy(threshold=0.9, max_new_tokens=20), greedy(threshold=0.019, block_size=8)])
def test_batched_equals_single(engine, sp):
    together = engine.generate(PROMPTS, sp)
    for i, p in enumerate(PROMPTS):
        alone = engine.generate([p], sp)
        assert alone.response_ids[0] == together.response_ids[i]
        assert alone.step_maps[0] == together.step_maps[i]
        assert alone.num_store_passes[0] == together.num_store_passes[i]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("sp", [
    greedy(threshold=0.9),
    greedy(threshold=0.018, block_size=8, max_new_tokens=20),
    greedy(remasking_strategy="low_confidence_static", denoising_steps=2),
    greedy(remasking_strategy="sequential", denoising_steps=4, block_size=8),
    SamplingParams(block_size=4, threshold=0.05, max_new_tokens=16, top_k=20, top_p=0.9, temperature=0.2, seed=3,
                   samples_per_prompt=2),
    greedy(threshold=0.018, block_size=8, max_new_tokens=20, stop_token_ids=(79, 8, 99)),
    greedy(threshold=0.018, block_size=8, max_new_tokens=20, stop_token_ids=(79, 8, 99), eos_policy="keep_final_block"),
], ids=["dyn-0.9", "dyn-0.018-b8", "static-k2", "sequential-k2", "sampled", "stop-truncate", "stop-keep-block"])
def test_cached_equals_uncached_reference(tiny_tokenizer, tiny_lm, shift, sp):
    lm = build_tiny_model(tiny_tokenizer, block_size=4, logit_shift=True, seed=2).eval() if shift else tiny_lm
    eng = NativeEngine(lm, tiny_tokenizer)
    prompts = PROMPTS[:3]
    out = eng.generate(prompts, sp)
    g = sp.samples_per_prompt
    for i, p in enumerate(eng.encode(prompts)):
        for j in range(g):
            ids, sm, why = reference_decode(lm, p, sp, eng.pad_id, row=i * g + j)
            assert out.response_ids[i * g + j] == ids
            assert out.step_maps[i * g + j] == sm
            assert out.finish_reasons[i * g + j] == why
    if sp.stop_token_ids:  # ids the models emit mid-response (seen in their greedy runs)
        assert "stop" in out.finish_reasons


def test_seeds(engine):
    sp = SamplingParams(block_size=4, threshold=0.05, temperature=1.0, max_new_tokens=16, samples_per_prompt=3, seed=7)
    a, b = engine.generate(PROMPTS[:2], sp), engine.generate(PROMPTS[:2], sp)
    assert a.response_ids == b.response_ids and a.step_maps == b.step_maps
    c = engine.generate(PROMPTS[:2], dataclasses.replace(sp, seed=8))
    assert c.response_ids != a.response_ids
    assert len({tuple(r) for r in a.response_ids[:3]}) > 1  # the G samples of a group differ


def test_group_samples_share_prefill(engine):
    one = engine.generate(PROMPTS[:2], greedy(threshold=0.019))
    three = engine.generate(PROMPTS[:2], greedy(threshold=0.019, samples_per_prompt=3))
    assert three.group_index.tolist() == [0, 0, 0, 1, 1, 1]
    for r in range(6):
        assert three.response_ids[r] == one.response_ids[r // 3]
        assert three.step_maps[r] == one.step_maps[r // 3]
        assert three.prompt_ids[r] == one.prompt_ids[r // 3]


def test_row_chunks_do_not_change_results(tiny_lm, tiny_tokenizer, engine):
    sp = greedy(threshold=0.019, samples_per_prompt=2)
    small = NativeEngine(tiny_lm, tiny_tokenizer, max_rows=3).generate(PROMPTS, sp)
    full = engine.generate(PROMPTS, sp)
    assert small.response_ids == full.response_ids and small.step_maps == full.step_maps
    assert small.group_index.tolist() == full.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# ---------------------------------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def stop_case(engine):
    """A reference greedy run (one token per forward) and a stop id it emits inside its third block."""
    prompt = "Q: 5*6=?\nA: "  # 12 characters: blocks of 4 start right after the prompt
    sp = greedy(threshold=1.0, max_new_tokens=24)
    ref = engine.generate([prompt], sp)
    ids = ref.response_ids[0]
    stop = ids[9]
    first = ids.index(stop)
    assert first < 20, "pick another position: the stop must fall before the last block"
    return prompt, sp, ref, stop, first


def test_stop_truncate(engine, stop_case):
    prompt, sp, ref, stop, first = stop_case
    out = engine.generate([prompt], dataclasses.replace(sp, stop_token_ids=(stop, 100_000)))
    assert out.response_ids[0] == ref.response_ids[0][: first + 1]
    assert out.response_ids[0][-1] == stop
    assert out.step_maps[0] == ref.step_maps[0][: first + 1]
    assert out.finish_reasons == ["stop"]
    assert out.num_forwards.tolist() == [len(set(out.step_maps[0]))]
    assert out.num_store_passes.tolist() == [blocks_touched(12, first + 1, 4) - 1]


def test_stop_keep_final_block(engine, stop_case):
    prompt, sp, ref, stop, first = stop_case
    out = engine.generate([prompt], dataclasses.replace(sp, stop_token_ids=(stop,), eos_policy="keep_final_block"))
    ids, sm = out.response_ids[0], out.step_maps[0]
    assert (12 + len(ids)) % 4 == 0  # ends on a block boundary (the prompt ends on one too)
    assert first < len(ids) <= first + 4  # the stop token's block, whole
    assert ids == ref.response_ids[0][: len(ids)] and sm == ref.step_maps[0][: len(ids)]
    assert len(sm) == len(ids) and min(sm) >= 1
    assert out.finish_reasons == ["stop"]


def test_budget_ends_mid_block(engine, tiny_tokenizer, monkeypatch):
    lm, pad, mask = engine.lm, engine.pad_id, engine.lm.bd.mask_token_id
    prompt = "abcdef"  # 6 tokens; block 4: [4, 8) holds the prompt tail, the budget ends at 11 inside [8, 12)
    seen = []
    real = lm.forward_chunk

    def spy(cache, input_ids, **kw):
        starts = cache.lengths if kw.get("rows") is None else cache.lengths[kw["rows"]]
        pos = starts[:, None] + torch.arange(input_ids.shape[1])
        seen.append((pos, input_ids.clone(), kw.get("key_valid")))
        return real(cache, input_ids, **kw)

    plain = engine.generate([prompt], greedy(max_new_tokens=5))
    assert pad not in plain.response_ids[0]
    monkeypatch.setattr(lm, "forward_chunk", spy)
    for policy in ("truncate", "keep_final_block"):
        # the pad id fills positions past the budget; as a stop id it would fire if those counted as generated
        out = engine.generate([prompt], greedy(max_new_tokens=5, stop_token_ids=(pad,), eos_policy=policy))
        assert out.response_ids == plain.response_ids and len(out.response_ids[0]) == 5
        assert out.finish_reasons == ["length"] and len(out.step_maps[0]) == 5
    for pos, ids, valid in seen[1:]:  # skip the prefill
        past = pos >= 11
        assert not (ids[past] == mask).any() and not valid[past].any()


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate(["ok", ""], greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], greedy())
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate([], greedy())
    with pytest.raises(ValueError, match="block_size"):
        greedy(block_size=0)
    with pytest.raises(ValueError, match="block_size"):
        greedy(block_size=-4)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            greedy(threshold=bad)
    with pytest.raises(ValueError, match="group size"):
        greedy(samples_per_prompt=0)
    with pytest.raises(ValueError, match="context"):
        engine.generate(["a" * 600], greedy())
    with pytest.raises(ValueError, match="context"):
        engine.generate(["ok", "a" * 500], greedy(max_new_tokens=32))
    sp = greedy()
    sp.threshold = 2.0  # mutated after construction: generate() validates again
    with pytest.raises(ValueError, match="threshold"):
        engine.generate(["ok"], sp)


# ---------------------------------------------------------------------------------------------- weights, misc
def test_update_weights_in_process(tiny_tokenizer):
    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0).eval()
    before_lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0).eval()
    other = build_tiny_model(tiny_tokenizer, block_size=4, seed=11).eval()
    sp = greedy(threshold=0.019)
    eng = NativeEngine(lm, tiny_tokenizer)
    before = eng.generate(PROMPTS[:3], sp)
    target = NativeEngine(other, tiny_tokenizer).generate(PROMPTS[:3], sp)
    assert before.response_ids != target.response_ids
    eng.update_weights(other.model.state_dict())
    after = eng.generate(PROMPTS[:3], sp)
    assert after.response_ids == target.response_ids and after.step_maps == target.step_maps
    assert eng.weight_version == 1 and after.weight_version == 1
    eng.update_weights(iter(other.model.named_parameters()), version=7)
    assert eng.weight_version == 7
    with pytest.raises(KeyError, match="unknown"):
        eng.update_weights({"model.layers.99.mlp.up_proj.weight": torch.zeros(1)})
    # a bad update changes nothing: names and shapes are checked before any copy
    snapshot = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fresh = build_tiny_model(tiny_tokenizer, block_size=4, seed=12).model.state_dict()
    with pytest.raises(KeyError, match="unknown"):
        eng.update_weights({**fresh, "not.a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights({**fresh, "lm_head.weight": torch.zeros(1)})
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snapshot.items()) and eng.weight_version == 7
    # names of the BlockDiffusionLM wrapper (one more "model." in front) work too
    eng.update_weights(before_lm.state_dict())
    assert eng.generate(PROMPTS[:3], sp).response_ids == before.response_ids


def test_progress_bar_runs(tiny_lm, tiny_tokenizer):
    out = NativeEngine(tiny_lm, tiny_tokenizer, progress=True, max_rows=2).generate(PROMPTS[:3], greedy())
    assert len(out) == 3


def test_texts_and_record_shapes(engine, tiny_tokenizer):
    out = engine.generate(PROMPTS[:2], greedy(samples_per_prompt=2))
    assert len(out) == 4 and out.num_groups == 2
    assert out.texts == tiny_tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    assert out.prompt_ids[0] == tiny_tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    assert out.weight_version == engine.weight_version
