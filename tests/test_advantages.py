"""Advantages (spec §3.5): batch / prompt_group (unbiased std) / prompt_group_center, and the collapse ratio."""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.advantages import collapse_ratio, compute_advantages


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_batch_uses_unbiased_std_over_everything():
    # R = [1, 2, 3, 6]: mean 3, deviations [−2, −1, 0, 3], Σd² = 14, unbiased std √(14/3) = 2.160247
    # A = d / 2.160247 = [−0.925820, −0.462910, 0, 1.388730] (population std √3.5 would give 1.603567 last)
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    close(compute_advantages(r, torch.tensor([0, 0, 1, 1]), "batch"), [-0.925820, -0.462910, 0.0, 1.388730])


def test_batch_degenerate_cases():
    assert compute_advantages(torch.tensor([5.0]), torch.tensor([0]), "batch").tolist() == [0.0]
    flat = compute_advantages(torch.tensor([0.1, 0.1, 0.1]), torch.tensor([0, 1, 2]), "batch")
    close(flat, [0.0, 0.0, 0.0], tol=1e-6)  # std 0 → max(std, eps): (R − mean)/eps stays ~0


def test_prompt_group_unbiased_per_group():
    # group 0 = [1, 2, 6]: mean 3, Σd² = 14, unbiased std √7 = 2.645751 → [−0.755929, −0.377964, 1.133893]
    # group 1 = [4, 4]: std 0 → 0; group 2 = [5] alone → 0
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    close(compute_advantages(r, g, "prompt_group"), [-0.755929, -0.377964, 1.133893, 0.0, 0.0, 0.0])


def test_prompt_group_center():
    # R − group mean: group 0 mean 3 → [−2, −1, 3]; group 1 → [0, 0]; group 2 → [0]
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    close(compute_advantages(r, g, "prompt_group_center"), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])


def test_advantage_input_checks():
    with pytest.raises(ValueError, match="mode must be"):
        compute_advantages(torch.ones(2), torch.tensor([0, 0]), "token")
    with pytest.raises(ValueError, match="rewards must be a 1-D tensor of length 2"):
        compute_advantages(torch.ones(3), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="eps must be > 0"):
        compute_advantages(torch.ones(2), torch.tensor([0, 0]), eps=0.0)


def test_collapse_ratio_counts_within_group_pairs_only():
    # group 0 = [0, 0.005, 0.2]: |ΔA| = 0.005, 0.2, 0.195; group 1 = [1.0, 1.03]: 0.03; group 2 alone: no pair.
    # 4 pairs: τ=0.01 → {0.005} = 1/4; τ=0.05 → {0.005, 0.03} = 2/4; τ=0.1 → 2/4; τ=0.5 → 4/4.
    # (Counting cross-group pairs, e.g. 0.2 vs 1.0 or the singleton 5.0, would change every ratio.)
    a = torch.tensor([0.0, 0.005, 0.2, 1.0, 1.03, 5.0], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    assert collapse_ratio(a, g) == pytest.approx({0.01: 0.25, 0.05: 0.5, 0.1: 0.5, 0.5: 1.0})
    assert list(collapse_ratio(a, g, taus=(0.5, 0.01))) == [0.5, 0.01]


def test_collapse_ratio_without_pairs_and_bad_taus():
    assert collapse_ratio(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), taus=(0.1,)) == {0.1: 0.0}
    with pytest.raises(ValueError, match="taus must be > 0"):
        collapse_ratio(torch.tensor([1.0]), torch.tensor([0]), taus=(0.0,))
