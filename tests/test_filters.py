"""Group filters (spec §3.4): each rule, the first-rule-wins counting, disabled rules and group ids."""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.filters import filter_groups

T, F = True, False
# Five groups of three responses:
#   g0 all wrong, TPF range 2                         → all_wrong
#   g1 one correct, TPF range 0.005 < 0.01            → tpf_range
#   g2 all correct, TPF range 2, flat total reward    → zero_std (only when enabled)
#   g3 all wrong, flat TPF, flat total                → all three rules; counted under all_wrong
#   g4 mixed, TPF range 4, spread total               → kept
CORRECT = torch.tensor([F, F, F, T, F, F, T, T, T, F, F, F, T, F, T])
TPF = torch.tensor([1.0, 2.0, 3.0, 2.0, 2.005, 2.0, 1.0, 2.0, 3.0, 2.0, 2.0, 2.0, 1.0, 3.0, 5.0])
TOTAL = torch.tensor([-1.0, -0.5, 0.0, 1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0, 2.0])
GROUPS = torch.arange(5).repeat_interleave(3)


def run(**kw):
    return filter_groups(CORRECT, TPF, TOTAL, GROUPS, **kw)


def test_default_rules():
    res = run()
    assert res.kept.tolist() == [2, 4] and res.kept.dtype == torch.long
    assert (res.num_groups, res.dropped_all_wrong, res.dropped_tpf_range, res.dropped_zero_std) == (5, 2, 1, 0)
    assert res.keep_rows.tolist() == [F] * 6 + [T] * 3 + [F] * 3 + [T] * 3
    assert res.num_kept == 2


def test_zero_std_rule_and_combined_counts():
    res = run(zero_std=True)
    assert res.kept.tolist() == [4]
    # g3 would trip all three rules but is counted once, under all_wrong.
    assert (res.dropped_all_wrong, res.dropped_tpf_range, res.dropped_zero_std) == (2, 1, 1)
    assert res.dropped_all_wrong + res.dropped_tpf_range + res.dropped_zero_std + res.num_kept == res.num_groups


def test_rules_can_be_disabled():
    res = run(all_wrong=False)  # g0 has TPF range 2 → kept; g3 now falls to the TPF rule
    assert res.kept.tolist() == [0, 2, 4]
    assert (res.dropped_all_wrong, res.dropped_tpf_range, res.dropped_zero_std) == (0, 2, 0)
    res = run(all_wrong=False, tpf_range_threshold=None, zero_std=True)  # only flat totals: g2, g3
    assert res.kept.tolist() == [0, 1, 4] and res.dropped_zero_std == 2
    res = run(all_wrong=False, tpf_range_threshold=None)
    assert res.kept.tolist() == [0, 1, 2, 3, 4]
    res = run(tpf_range_threshold=0.001)  # g1's range 0.005 now passes
    assert res.kept.tolist() == [1, 2, 4] and res.dropped_tpf_range == 0


def test_tpf_range_is_strict_and_group_ids_are_preserved():
    # range 2.5 − 2.0 = 0.5 is not < 0.5 → kept; range 0.25 < 0.5 → dropped. Ids 30 and 7 are returned sorted.
    res = filter_groups(torch.tensor([T, F, T, F]), torch.tensor([2.0, 2.5, 1.0, 1.25]), torch.zeros(4),
                        torch.tensor([30, 30, 7, 7]), tpf_range_threshold=0.5)
    assert res.kept.tolist() == [30] and res.dropped_tpf_range == 1
    assert res.keep_rows.tolist() == [T, T, F, F]


def test_single_response_groups():
    # A lone response has TPF range 0 and std 0.
    res = filter_groups(torch.tensor([T]), torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0]))
    assert res.kept.tolist() == [] and res.dropped_tpf_range == 1


def test_filter_input_checks():
    with pytest.raises(ValueError, match="correct must be a bool tensor"):
        filter_groups(torch.ones(3), TPF[:3], TOTAL[:3], GROUPS[:3])
    with pytest.raises(ValueError, match="tpf must be a 1-D tensor of length 15"):
        filter_groups(CORRECT, TPF[:3], TOTAL, GROUPS)
    with pytest.raises(ValueError, match="tpf_range_threshold must be >= 0"):
        run(tpf_range_threshold=-1.0)
