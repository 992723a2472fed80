"""torchmetrics metrics: response accuracy (mean) and tokens per forward (ratio of sums)."""

from __future__ import annotations

import pytest
import torch

from lrl.metrics import ResponseAccuracy, TokensPerForward


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_response_accuracy_mean_of_bools_and_scores():
    m = ResponseAccuracy()
    assert float(m.compute()) == 0.0
    m.update(torch.tensor([True, False, True]))
    m.update(torch.tensor([0.5]))
    assert float(m.compute()) == pytest.approx((1 + 0 + 1 + 0.5) / 4)  # 0.625
    m.reset()
    m.update([False, False])
    assert float(m.compute()) == 0.0
    with pytest.raises(ValueError, match=r"correct must lie in \[0, 1\]"):
        m.update(torch.tensor([2.0]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_tokens_per_forward_is_a_ratio_of_sums():
    m = TokensPerForward()
    assert float(m.compute()) == 0.0
    m.update(torch.tensor([10, 20]), torch.tensor([5, 2]))
    # Σ tokens / Σ forwards = 30/7 = 4.285714 (the mean of per-response ratios would be (2 + 10)/2 = 6)
    assert float(m.compute()) == pytest.approx(30 / 7)
    m.update(6, 3)  # scalars: 36/10
    assert float(m.compute()) == pytest.approx(3.6)
    with pytest.raises(ValueError, match="same length"):
        m.update(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="must be >= 0"):
        m.update(torch.tensor([-1]), torch.tensor([1]))
