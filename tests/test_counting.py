"""Tokens and forwards (spec §2.5, docs/metrics.md): tokens stop at the stop token (keep_final_block's filler is
not counted), forwards in the paper's count (distinct step ids of the returned tokens) and as spent (the final
block's tail that truncate decoded after the stop token included). Numbers worked out by hand; block size 4,
stop id 9."""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.types import RolloutBatch, SamplingParams

STOP = 9


def _batch(rows, policy="truncate"):
    """rows: (response_ids, step_map, tail_ids, tail_step_map, finish_reason, engine num_forwards)."""
    n = len(rows)
    return RolloutBatch(
        prompt_ids=[[1]] * n, response_ids=[r[0] for r in rows], texts=[""] * n, step_maps=[r[1] for r in rows],
        num_forwards=torch.tensor([r[5] for r in rows]), num_store_passes=torch.tensor([1] * n),
        finish_reasons=[r[4] for r in rows], group_index=torch.zeros(n, dtype=torch.long),
        tail_ids=[r[2] for r in rows], tail_step_maps=[r[3] for r in rows],
        sampling=SamplingParams(block_size=4, max_new_tokens=8, stop_token_ids=(STOP,), eos_policy=policy),
    )


# truncate, stop early in block 2 (its 2nd position): block 1 took forwards 1-3, block 2's first forward (4)
# unmasked the stop token, forwards 5 and 6 decoded only the two positions after it
EARLY_TRUNC = ([5, 6, 7, 8, 5, STOP], [1, 1, 2, 3, 4, 4], [6, 7], [5, 6], "stop", 4)
# truncate, stop on the last position of block 1: no tail
LATE = ([5, 6, 7, STOP], [1, 2, 2, 3], [], [], "stop", 3)
# keep_final_block, the same early stop: the filler [6, 7] comes back with its step ids 5, 6
EARLY_KEEP = ([5, 6, 7, 8, 5, STOP, 6, 7], [1, 1, 2, 3, 4, 4, 5, 6], [], [], "stop", 6)
# length stop: every token counts
LENGTH = ([5, 6, 7, 8, 5, 6, 7, 8], [1, 2, 3, 4, 5, 5, 6, 6], [], [], "length", 6)


def test_truncate_early_stop_counts_the_tail_forwards_as_spent():
    b = _batch([EARLY_TRUNC, LATE, LENGTH])
    assert b.response_lengths.tolist() == [6, 4, 8]
    assert b.num_forwards.tolist() == [4, 3, 6]  # the paper's count: distinct step ids of the returned tokens
    assert b.forwards_spent.tolist() == [6, 3, 6]  # + forwards 5 and 6 of the first response's tail
    torch.testing.assert_close(b.tpf, torch.tensor([6 / 4, 4 / 3, 8 / 6]))
    torch.testing.assert_close(b.tpf_spent, torch.tensor([1.0, 4 / 3, 8 / 6]))
    assert b.batch_tpf == pytest.approx(18 / 13) and b.batch_tpf_spent == pytest.approx(18 / 15)


def test_tail_forward_that_also_unmasked_returned_tokens_is_counted_once():
    # forward 4 unmasked the stop token and the tail's first position; forward 5 only the tail's second
    row = ([5, 6, 7, 8, 5, STOP], [1, 1, 2, 3, 4, 4], [6, 7], [4, 5], "stop", 4)
    assert _batch([row]).forwards_spent.tolist() == [5]


def test_keep_final_block_filler_is_not_counted_as_tokens():
    b = _batch([EARLY_KEEP, LATE], policy="keep_final_block")
    assert b.returned_lengths.tolist() == [8, 4]  # what training sees
    assert b.response_lengths.tolist() == [6, 4]  # the filler [6, 7] after the stop token is not counted
    assert b.num_forwards.tolist() == b.forwards_spent.tolist() == [6, 3]  # its forwards ran and count in both
    torch.testing.assert_close(b.tpf, torch.tensor([1.0, 4 / 3]))  # was 8 / 6 with the filler counted
    # the same rollout under truncate spends the same 6 forwards on the same 6 tokens
    assert _batch([EARLY_TRUNC]).tpf_spent.tolist() == b.tpf[:1].tolist()


def test_without_known_stop_ids_every_returned_token_counts():
    b = _batch([EARLY_KEEP], policy="keep_final_block")
    b.sampling = None  # a generator that does not say how it stopped
    assert b.response_lengths.tolist() == [8]


def test_spent_counts_of_a_step_sum_every_drawn_response():
    from lrl.pipeline import spent_counts

    out = spent_counts([_batch([EARLY_TRUNC, LATE]), _batch([LENGTH])])
    # tokens 6 + 4 + 8 = 18; paper forwards 4 + 3 + 6 = 13; spent 6 + 3 + 6 = 15; store passes 1 each
    assert out == {"rollout/tokens": 18.0, "rollout/forwards_paper": 13.0, "rollout/forwards_spent": 15.0,
                   "rollout/store_passes": 3.0, "rollout/tpf_paper": pytest.approx(18 / 13),
                   "rollout/tpf_spent": pytest.approx(18 / 15)}


def test_pareto_point_and_table_carry_the_spent_count():
    from lrl.evaluation.pareto import ParetoPoint, ParetoResult, format_table

    p = ParetoPoint("dynamic@0.9", 0.9, 50.0, 18 / 13, 18, 13, 3, 0.1, 3, forwards_spent=15)
    assert p.tpf_spent == pytest.approx(1.2)
    table = format_table(ParetoResult(points=[p], aup=0.0, y_max=50.0))
    assert "| TPF spent | forwards spent |" in table and "| 1.20 | 15 |" in table
    assert ParetoPoint("old", None, 1.0, 1.0, 1, 1, 0, 0.0, 1).tpf_spent is None  # older results: unknown


def test_engine_truncate_spends_what_keep_final_block_returns(tiny_lm, tiny_tokenizer):
    """The native engine decodes the same final block under both policies (same seed): truncate's spent forwards
    equal keep_final_block's forwards, and both count the same tokens."""
    from lrl.rollout.engine import NativeEngine

    engine = NativeEngine(tiny_lm, tiny_tokenizer, max_rows=64)
    stops = (tiny_tokenizer.convert_tokens_to_ids("1"), tiny_tokenizer.convert_tokens_to_ids("2"))
    runs = {}
    for policy in ("truncate", "keep_final_block"):
        sp = SamplingParams(block_size=4, threshold=0.3, max_new_tokens=16, stop_token_ids=stops, samples_per_prompt=8,
                            seed=5, eos_policy=policy)
        runs[policy] = engine.generate(["1+2=", "3+4="], sp)
    t, k = runs["truncate"], runs["keep_final_block"]
    assert t.response_lengths.tolist() == k.response_lengths.tolist()
    assert t.forwards_spent.tolist() == k.num_forwards.tolist() == k.forwards_spent.tolist()
    mid_block = [i for i in range(len(t)) if t.tail_ids[i]]
    assert mid_block, "no response stopped mid-block: the case under test did not occur"
    assert any(int(t.forwards_spent[i]) > int(t.num_forwards[i]) for i in mid_block)
