"""Reward shaping (spec §3.3): every normalisation mode, accuracy mode, length penalty, joint vs decoupled."""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.reward_shaping import accuracy_reward, apply_length_penalty, group_normalize
from lrl.rewards.terms import TPF as TPFTerm
from lrl.rewards.terms import Accuracy, shape_terms
from lrl.rollout.types import RolloutBatch

T, F = True, False
# Three groups: [1, 2, 3] (spread), [4, 4, 4] (flat), [0, 10] (two values).
VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 0.0, 10.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_none_multiplies_by_the_coefficient():
    # 0.5 · v
    close(group_normalize(VALUES, GROUPS, "none", 0.5), [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 0.0, 5.0])


def test_z_score_population_std_and_flat_group():
    # group 0: mean 2, population var (1 + 0 + 1)/3 = 2/3, std 0.816497 → ±1/0.816497 = ±1.224745
    # group 1: flat (std 0) → 0; group 2: mean 5, population std 5 → ±1 (unbiased would give ±0.707107)
    z = group_normalize(VALUES, GROUPS, "z_score")
    close(z, [-1.224745, 0.0, 1.224745, 0.0, 0.0, 0.0, -1.0, 1.0])
    # The coefficient multiplies the z-score too (the released math code ignores it there).
    close(group_normalize(VALUES, GROUPS, "z_score", 2.0), [-2.449490, 0.0, 2.449490, 0.0, 0.0, 0.0, -2.0, 2.0])


def test_z_score_treats_rounding_noise_as_flat():
    # float32 0.1 three times: the mean differs from 0.1 by rounding only; that must not blow up to ±1.
    v = torch.tensor([0.1, 0.1, 0.1, 2.0, 2.0 + 1e-7])
    g = torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(group_normalize(v, g, "z_score"), torch.zeros(5))


def test_minmax_and_flat_group_half():
    # group 0: (v − 1)/(3 − 1) = [0, 0.5, 1]; group 1 flat → 0.5; group 2: (v − 0)/10 = [0, 1]
    close(group_normalize(VALUES, GROUPS, "minmax"), [0.0, 0.5, 1.0, 0.5, 0.5, 0.5, 0.0, 1.0])
    # coefficient 0.1 (the code fallback): 0.1 · the above, flat group 0.05
    close(group_normalize(VALUES, GROUPS, "minmax", 0.1), [0.0, 0.05, 0.1, 0.05, 0.05, 0.05, 0.0, 0.1])


def test_groups_need_not_be_sorted_or_contiguous():
    # group 5 = [1, 3, 2] (mean 2, std 0.816497), group 9 = [10, 20] (mean 15, std 5)
    v = torch.tensor([1.0, 3.0, 10.0, 20.0, 2.0])
    g = torch.tensor([5, 5, 9, 9, 5])
    close(group_normalize(v, g, "z_score"), [-1.224745, 1.224745, -1.0, 1.0, 0.0])


def test_accuracy_pm1_maps_bools_and_pass_rates():
    g = torch.tensor([0, 0, 0])
    close(accuracy_reward(torch.tensor([T, F, T]), g, "pm1"), [1.0, -1.0, 1.0])
    # pass rates p → 2p − 1: 0 → −1, 0.25 → −0.5, 1 → 1
    close(accuracy_reward(torch.tensor([0.0, 0.25, 1.0]), g, "pm1"), [-1.0, -0.5, 1.0])


def test_accuracy_z_score_and_raw():
    # group 0 = [1, 0, 0, 0]: mean 0.25, var (0.5625 + 3·0.0625)/4 = 0.1875, std 0.433013
    #   → 0.75/0.433013 = 1.732051, −0.25/0.433013 = −0.577350; group 1 all correct → flat → 0
    acc = torch.tensor([T, F, F, F, T, T])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    close(accuracy_reward(acc, g, "z_score"), [1.732051, -0.577350, -0.577350, -0.577350, 0.0, 0.0])
    close(accuracy_reward(torch.tensor([0.25, 1.0]), torch.tensor([0, 0]), "raw"), [0.25, 1.0])


def test_length_penalty():
    correct = torch.tensor([T, T, F, T])
    truncated = torch.tensor([F, T, F, F])
    assert apply_length_penalty(correct, truncated).tolist() == [T, F, F, T]
    assert apply_length_penalty(correct, truncated, enabled=False).tolist() == [T, T, F, T]
    # Float pass rates: truncated rows become 0.
    close(apply_length_penalty(torch.tensor([1.0, 0.5]), torch.tensor([T, F])), [0.0, 0.5])


ACC = torch.tensor([T, F, T, T])
TPF = torch.tensor([2.0, 4.0, 3.0, 3.0])
G2 = torch.tensor([0, 0, 1, 1])


def shape_rewards(acc, tpf, groups, acc_mode="pm1", tpf_mode="z_score", tpf_coefficient=1.0, joint=False):
    """The two terms of the paper's reward (`lrl.rewards.terms`) on a batch with these accuracies and TPFs (lengths
    2·TPF over 2 forwards each), in the spelling of the flat settings they replaced."""
    n = len(acc)
    batch = RolloutBatch(prompt_ids=[[0]] * n, response_ids=[[1] * int(2 * t) for t in tpf.tolist()], texts=[""] * n,
                         step_maps=[[1] * int(2 * t) for t in tpf.tolist()], num_forwards=torch.full((n,), 2),
                         num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
                         group_index=groups)
    batch.accuracy = acc.float()
    terms = [Accuracy(normalize="none" if acc_mode == "raw" else acc_mode),
             TPFTerm(weight=tpf_coefficient, normalize=tpf_mode)]
    return shape_terms(terms, batch, joint=tpf_mode if joint else None)


def test_shape_rewards_decoupled_pm1_z():
    # acc ±1 = [1, −1, 1, 1]; TPF z: group 0 [2, 4] → mean 3, std 1 → [−1, 1]; group 1 flat → [0, 0]
    # total = [1 − 1, −1 + 1, 1 + 0, 1 + 0] = [0, 0, 1, 1]
    out = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="z_score", tpf_coefficient=1.0)
    assert set(out) == {"acc_raw", "tpf_raw", "acc", "tpf", "total"}
    close(out["acc_raw"], [1.0, 0.0, 1.0, 1.0])
    close(out["tpf_raw"], [2.0, 4.0, 3.0, 3.0])
    close(out["acc"], [1.0, -1.0, 1.0, 1.0])
    close(out["tpf"], [-1.0, 1.0, 0.0, 0.0])
    close(out["total"], [0.0, 0.0, 1.0, 1.0])


def test_shape_rewards_decoupled_minmax_with_coefficient():
    # TPF minmax · 0.5: group 0 [0, 1]·0.5 = [0, 0.5]; group 1 flat 0.5·0.5 = 0.25
    # total = [1 + 0, −1 + 0.5, 1 + 0.25, 1 + 0.25]
    out = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="minmax", tpf_coefficient=0.5)
    close(out["total"], [1.0, -0.5, 1.25, 1.25])


def test_shape_rewards_decoupled_z_z():
    # acc z: group 0 [1, 0] → [1, −1], group 1 flat → 0; TPF [4, 2, 3, 3] z → [1, −1, 0, 0]; total [2, −2, 0, 0]
    out = shape_rewards(ACC, torch.tensor([4.0, 2.0, 3.0, 3.0]), G2, acc_mode="z_score", tpf_mode="z_score")
    close(out["acc"], [1.0, -1.0, 0.0, 0.0])
    close(out["total"], [2.0, -2.0, 0.0, 0.0])


def test_shape_rewards_joint_differs_from_decoupled():
    # joint: sum = ±1 + 0.5·TPF = [1 + 1, −1 + 2, 1 + 1.5, 1 + 1.5] = [2, 1, 2.5, 2.5]
    #   z per group: group 0 [2, 1] → mean 1.5, std 0.5 → [1, −1]; group 1 flat → [0, 0]
    joint = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="z_score", tpf_coefficient=0.5, joint=True)
    close(joint["total"], [1.0, -1.0, 0.0, 0.0])
    close(joint["acc"], [1.0, -1.0, 1.0, 1.0])
    close(joint["tpf"], [1.0, 2.0, 1.5, 1.5])
    # decoupled with the same settings: ±1 + 0.5·z(TPF) = [1 − 0.5, −1 + 0.5, 1, 1]
    dec = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="z_score", tpf_coefficient=0.5)
    close(dec["total"], [0.5, -0.5, 1.0, 1.0])


def test_shape_rewards_joint_minmax_none_and_raw():
    # sum [2, 1, 2.5, 2.5] minmax: group 0 → [1, 0], group 1 flat → 0.5
    out = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="minmax", tpf_coefficient=0.5, joint=True)
    close(out["total"], [1.0, 0.0, 0.5, 0.5])
    # "none": the sum itself
    out = shape_rewards(ACC, TPF, G2, acc_mode="pm1", tpf_mode="none", tpf_coefficient=0.5, joint=True)
    close(out["total"], [2.0, 1.0, 2.5, 2.5])
    # raw accuracy: [1, 0, 1, 1] + 0.25·TPF [0.5, 1, 0.75, 0.75] = [1.5, 1, 1.75, 1.75], none → unchanged
    out = shape_rewards(ACC, TPF, G2, acc_mode="raw", tpf_mode="none", tpf_coefficient=0.25, joint=True)
    close(out["total"], [1.5, 1.0, 1.75, 1.75])


def test_bad_input_is_rejected_by_name():
    with pytest.raises(ValueError, match="values must be a 1-D tensor of length 3"):
        group_normalize(torch.ones(2), torch.tensor([0, 0, 1]), "z_score")
    with pytest.raises(ValueError, match="group_index must be an integer tensor"):
        group_normalize(torch.ones(2), torch.tensor([0.0, 1.0]), "z_score")
    with pytest.raises(ValueError, match="group_index must be >= 0"):
        group_normalize(torch.ones(2), torch.tensor([0, -1]), "z_score")
    with pytest.raises(ValueError, match="values contains NaN"):
        group_normalize(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), "z_score")
    with pytest.raises(ValueError, match="mode must be"):
        group_normalize(torch.ones(2), torch.tensor([0, 0]), "rank")
    with pytest.raises(ValueError, match=r"accuracy must lie in \[0, 1\]"):
        accuracy_reward(torch.tensor([2.0]), torch.tensor([0]), "pm1")
    with pytest.raises(ValueError, match="mode must be 'pm1'"):
        accuracy_reward(torch.tensor([1.0]), torch.tensor([0]), "sign")
    with pytest.raises(ValueError, match=r"data.init_args.rewards: Accuracy.normalize must be one of pm1, z_score"):
        Accuracy(normalize="sign")
    with pytest.raises(ValueError, match=r"data.init_args.rewards: TPF.weight must be finite"):
        TPFTerm(weight=float("inf"))
    with pytest.raises(ValueError, match="truncated must be a bool tensor"):
        apply_length_penalty(ACC, torch.zeros(4))
