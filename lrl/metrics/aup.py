"""AUP (accuracy under parallelism) and the accuracy–TPF Pareto frontier (spec §6.3, d3LLM definition)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal


class AUPPointsDropped(UserWarning):
    """Points more than ``y_min_offset`` below the first point's accuracy were left out of an AUP (d3LLM's
    ``get_aup`` asserts instead)."""


def _check_points(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    if isinstance(points, str) or not isinstance(points, Sequence):
        raise ValueError(f"points must be a sequence of (tpf, accuracy) pairs, got {type(points).__name__}")
    out = []
    for i, p in enumerate(points):
        if isinstance(p, str) or not isinstance(p, Sequence) or len(p) != 2:
            raise ValueError(f"points[{i}] must be a (tpf, accuracy) pair, got {p!r}")
        rho, y = float(p[0]), float(p[1])
        if not (math.isfinite(rho) and math.isfinite(y)):
            raise ValueError(f"points[{i}] must be finite, got {p!r}")
        out.append((rho, y))
    return out


def aup(
    points: Sequence[Sequence[float]],
    y_max: float | None = None,
    alpha: float = 3.0,
    y_min_offset: float = 5.0,
    on_drop: Literal["warn", "raise", "ignore"] = "warn",
) -> float:
    """Area under the accuracy–parallelism curve of one method on one task (d3LLM ``get_aup``, spec §6.3).

    With points (ρ_i, y_i) = (TPF, accuracy in %) sorted by ρ ascending (stable for ties), y_1 the accuracy at the
    smallest ρ, and only points with y_i ≥ y_1 − ``y_min_offset`` kept (d3LLM asserts this; we drop the others,
    with an `AUPPointsDropped` warning, or raise with ``on_drop="raise"``; `aup_details` returns them)::

        W(y) = min(exp(−α (1 − y / y_max)), 1)
        AUP  = ρ_1·y_1 + Σ_{i≥2} ½ (ρ_i − ρ_{i−1}) (y_i W(y_i) + y_{i−1} W(y_{i−1}))

    The first term is not weighted, so a single point gives ρ·y.

    Args:
        points: (tpf, accuracy_percent) pairs, in any order.
        y_max: Accuracy that gets full weight; d3LLM uses the best accuracy of all methods on the task.
            ``None``: the best accuracy among ``points``.
        alpha: Steepness α of the accuracy-drop penalty.
        y_min_offset: Points more than this many percentage points below y_1 are dropped.
        on_drop: ``warn`` (default), ``raise`` (``ValueError``, as d3LLM) or ``ignore`` when points are dropped.

    Returns:
        The AUP value.

    Raises:
        ValueError: no points, a malformed point, ``y_max`` ≤ 0, or dropped points with ``on_drop="raise"``.
    """
    value, dropped = aup_details(points, y_max=y_max, alpha=alpha, y_min_offset=y_min_offset)
    if dropped and on_drop != "ignore":
        msg = (f"aup: {len(dropped)} point(s) {dropped} lie more than {y_min_offset:g} points below the accuracy of "
               f"the lowest-TPF point and were left out (d3LLM's get_aup refuses such curves)")
        if on_drop == "raise":
            raise ValueError(msg)
        warnings.warn(msg, AUPPointsDropped, stacklevel=2)
    return value


def aup_details(
    points: Sequence[Sequence[float]],
    y_max: float | None = None,
    alpha: float = 3.0,
    y_min_offset: float = 5.0,
) -> tuple[float, list[tuple[float, float]]]:
    """`aup` without the warning: ``(value, dropped points)`` (the (tpf, accuracy) pairs left out, by TPF)."""
    pts = _check_points(points)
    if not pts:
        raise ValueError("aup: points is empty")
    pts.sort(key=lambda p: p[0])
    y_first = pts[0][1]
    dropped = [p for p in pts if not p[1] >= y_first - y_min_offset]
    pts = [p for p in pts if p[1] >= y_first - y_min_offset]
    top = max(y for _, y in pts) if y_max is None else float(y_max)
    if not top > 0:
        raise ValueError(f"aup: y_max must be > 0, got {top}")

    def weight(y: float) -> float:
        return min(math.exp(-alpha * (1.0 - y / top)), 1.0)

    total = pts[0][0] * pts[0][1]
    for (r0, y0), (r1, y1) in zip(pts, pts[1:]):
        total += 0.5 * (r1 - r0) * (y1 * weight(y1) + y0 * weight(y0))
    return total, dropped


def pareto_frontier(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates; higher TPF and higher accuracy are better.

    A point is dominated when another is at least as good on both axes and strictly better on one; exact
    duplicates do not dominate each other, so both are kept.

    Args:
        points: (tpf, accuracy) pairs.

    Returns:
        Indices into ``points``.
    """
    pts = _check_points(points)
    front = []
    for i, (ri, yi) in enumerate(pts):
        dominated = any(rj >= ri and yj >= yi and (rj > ri or yj > yi) for rj, yj in pts)
        if not dominated:
            front.append(i)
    return front
