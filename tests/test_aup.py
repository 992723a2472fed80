"""AUP and the Pareto frontier (spec §6.3): published numbers and hand-computed curves."""

from __future__ import annotations

import math

import pytest

from lrl.metrics import aup, pareto_frontier


def test_single_point_is_rho_times_y():
    assert aup([(1.00, 83.9)]) == pytest.approx(83.9)  # Dream, Table 2
    assert aup([(1.00, 83.9)], y_max=90.0) == pytest.approx(83.9)  # the first term is not weighted
    assert aup([(5.58, 90.3)]) == pytest.approx(5.58 * 90.3)


def test_d3llm_llada_gsm8k():
    # W(74.02) = exp(−3(1 − 74.02/74.98)) = 0.962318, W(73.09) = 0.927168
    # 74.02 + ½·8.11·(73.09·0.927168 + 74.02·0.962318) = 74.02 + 4.055·(67.7667 + 71.2308) = 637.65
    assert aup([(1, 74.02), (9.11, 73.09)], y_max=74.98) == pytest.approx(637.65, abs=0.05)


CURVE = [(1.0, 80.0), (2.0, 78.0), (4.0, 76.0)]
# y_max 80: W(80) = 1, W(78) = exp(−3·0.025) = 0.927743, W(76) = exp(−3·0.05) = 0.860708
# 80·1 + ½·1·(78·0.927743 + 80) + ½·2·(76·0.860708 + 78·0.927743)
#   = 80 + ½(72.363992 + 80) + (65.413806 + 72.363992) = 80 + 76.181996 + 137.777798 = 293.959794
CURVE_AUP = 293.959794


def test_multi_point_hand_computed():
    assert aup(CURVE, y_max=80.0) == pytest.approx(CURVE_AUP, abs=1e-4)
    assert aup(CURVE) == pytest.approx(CURVE_AUP, abs=1e-4)  # y_max=None → best accuracy among the points = 80


def test_unsorted_input_and_offset_drop():
    assert aup(list(reversed(CURVE)), y_max=80.0) == pytest.approx(CURVE_AUP, abs=1e-4)
    # (3, 74) is below y_1 − 5 = 75: dropped instead of asserting, so the area is unchanged.
    shuffled = [(4.0, 76.0), (3.0, 74.0), (1.0, 80.0), (2.0, 78.0)]
    assert aup(shuffled, y_max=80.0) == pytest.approx(CURVE_AUP, abs=1e-4)
    # (1, 80), (2, 80), (4, 70): 70 < 75 dropped → 80 + ½·1·(80 + 80) = 160
    assert aup([(4.0, 70.0), (1.0, 80.0), (2.0, 80.0)]) == pytest.approx(160.0)
    # With a larger offset (10) it stays: W(70) = exp(−0.375) = 0.687289
    # 160 + ½·2·(70·0.687289 + 80) = 160 + 48.110226 + 80 = 288.110226
    assert aup([(4.0, 70.0), (1.0, 80.0), (2.0, 80.0)], y_min_offset=10.0) == pytest.approx(288.110226, abs=1e-4)


def test_weight_is_capped_and_alpha_matters():
    # y_max below the accuracies: W = min(exp(+...), 1) = 1 → 80 + ½·1·(78 + 80) = 159
    assert aup([(1.0, 80.0), (2.0, 78.0)], y_max=70.0) == pytest.approx(159.0)
    # α = 0: no penalty, plain trapezoid: 80 + ½(78 + 80) + ½·2·(76 + 78) = 80 + 79 + 154 = 313
    assert aup(CURVE, y_max=80.0, alpha=0.0) == pytest.approx(313.0)
    assert aup(CURVE, y_max=80.0, alpha=6.0) < CURVE_AUP


def test_aup_input_checks():
    with pytest.raises(ValueError, match="points is empty"):
        aup([])
    with pytest.raises(ValueError, match=r"points\[1\] must be a \(tpf, accuracy\) pair"):
        aup([(1.0, 80.0), (2.0,)])
    with pytest.raises(ValueError, match=r"points\[0\] must be finite"):
        aup([(math.nan, 80.0)])
    with pytest.raises(ValueError, match="y_max must be > 0"):
        aup([(1.0, 0.0)])


def test_pareto_frontier():
    pts = [(1.0, 80.0), (2.0, 78.0), (2.0, 70.0), (3.0, 78.0), (4.0, 60.0), (3.0, 78.0)]
    # (2, 78) and (2, 70) are dominated by (3, 78); the duplicate (3, 78)s do not dominate each other.
    assert pareto_frontier(pts) == [0, 3, 4, 5]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 50.0)]) == [0]


def test_aup_says_which_points_it_left_out():
    from lrl.metrics.aup import AUPPointsDropped, aup_details

    # (5, 70) lies 10 points below the first point's 80: left out. Kept (1, 80), (3, 79), y_max 80:
    # 1·80 + ½·2·(80 + 79·exp(−3·(1 − 79/80))) = 80 + 80 + 79·0.963194 = 236.0923 (d3LLM's get_aup asserts)
    curve = [(1, 80), (3, 79), (5, 70)]
    value, dropped = aup_details(curve)
    assert value == pytest.approx(236.0923, abs=1e-3) and dropped == [(5.0, 70.0)]
    with pytest.warns(AUPPointsDropped, match=r"1 point\(s\) \[\(5.0, 70.0\)\]"):
        assert aup(curve) == pytest.approx(value)
    with pytest.raises(ValueError, match="d3LLM's get_aup refuses"):
        aup(curve, on_drop="raise")
    assert aup_details([(1, 80), (3, 79)])[1] == []
