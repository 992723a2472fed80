"""Rollout diagnostics: does a batch give the TPF reward anything to select? (issue #12)

Logged every RL step from the rollouts as drawn (before group filtering), because the measurements that explained
the weak single-style results were exactly these: identical texts inside a group, a tiny within-group TPF spread,
and the forwards a response costs (a TPF gain bought with longer answers shows up there, not in TPF). The share of
the within-group TPF variance that lies *between different texts* says how much of what the z-scored TPF reward
ranks is a property of the answer (its layout, its style) rather than the luck of which positions crossed the
threshold in one sample: only the former can be learnt as "answer this way".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def rollout_diagnostics(
    texts: Sequence[str],
    tpf: torch.Tensor,
    num_forwards: torch.Tensor,
    lengths: torch.Tensor,
    group_index: torch.Tensor,
    styles: Sequence[str] | None = None,
    style_names: Sequence[str] = (),
    correct: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-batch diversity and cost statistics.

    Args:
        texts: N decoded responses.
        tpf: (N,) tokens per forward of each response.
        num_forwards: (N,) denoising forwards of each response.
        lengths: (N,) generated tokens of each response.
        group_index: (N,) prompt group of each response (0..G-1, every group non-empty).
        styles: N answer-style labels (`Task.response_style`), or None when the task has no styles.
        style_names: categories always reported (a share of 0 is logged too, so curves do not start late).
        correct: (N,) bool, which responses are correct, for the variance share among correct responses.

    Returns:
        ``rollout/distinct_texts_per_group`` (mean number of different texts in a group),
        ``rollout/identical_groups`` (fraction of groups whose responses are all the same text),
        ``rollout/tpf_std_in_group`` (mean over groups of the population std of TPF),
        ``rollout/forwards_per_response`` and ``rollout/tokens_per_response`` (means over responses),
        ``rollout/tpf_var_between_texts`` (pooled over groups: the between-text sum of squares of TPF around the
        group means over the total within-group sum of squares; 1 = samples of the same text always take the same
        forwards, 0 = every difference is sampling luck; absent when every group is flat), with ``correct`` the
        same among each group's correct responses (``rollout/tpf_var_between_texts_correct``),
        and with styles ``style/<name>`` (share of responses) and ``rollout/mixed_style_groups`` (fraction of groups
        with more than one style).
    """
    n = len(texts)
    if not (len(tpf) == len(num_forwards) == len(lengths) == len(group_index) == n):
        raise ValueError(
            f"rollout_diagnostics: {n} texts but {len(tpf)} tpf, {len(num_forwards)} forwards, {len(lengths)} "
            f"lengths and {len(group_index)} group ids"
        )
    if styles is not None and len(styles) != n:
        raise ValueError(f"rollout_diagnostics: {n} texts but {len(styles)} styles")
    if correct is not None and len(correct) != n:
        raise ValueError(f"rollout_diagnostics: {n} texts but {len(correct)} correctness flags")
    if n == 0:
        return {}
    groups = [torch.nonzero(group_index == g).flatten().tolist() for g in torch.unique(group_index).tolist()]
    distinct = [len({texts[i] for i in rows}) for rows in groups]
    tpf = tpf.float()
    out = {
        "rollout/distinct_texts_per_group": sum(distinct) / len(groups),
        "rollout/identical_groups": sum(d == 1 for d in distinct) / len(groups),
        "rollout/tpf_std_in_group": sum(float(tpf[rows].std(unbiased=False)) for rows in groups) / len(groups),
        "rollout/forwards_per_response": float(num_forwards.float().mean()),
        "rollout/tokens_per_response": float(lengths.float().mean()),
    }
    values = tpf.tolist()
    shares = {"rollout/tpf_var_between_texts": groups}
    if correct is not None:
        ok = correct.bool().tolist()
        shares["rollout/tpf_var_between_texts_correct"] = [[i for i in rows if ok[i]] for rows in groups]
    for key, subsets in shares.items():
        share = _between_text_share(texts, values, subsets)
        if share is not None:
            out[key] = share
    if styles is not None:
        counts = Counter(styles)
        for name in (*style_names, *sorted(set(counts) - set(style_names))):
            out[f"style/{name}"] = counts.get(name, 0) / n
        out["rollout/mixed_style_groups"] = sum(len({styles[i] for i in rows}) > 1 for rows in groups) / len(groups)
    return out


def _between_text_share(texts: Sequence[str], values: list[float], groups: list[list[int]]) -> float | None:
    """Pooled one-way decomposition of ``values`` inside each group by text: between-text over total sum of squares
    (None when the total is 0)."""
    total = between = 0.0
    for rows in groups:
        if len(rows) < 2:
            continue
        mean = sum(values[i] for i in rows) / len(rows)
        by_text: dict[str, list[float]] = {}
        for i in rows:
            by_text.setdefault(texts[i], []).append(values[i])
        total += sum((values[i] - mean) ** 2 for i in rows)
        between += sum(len(v) * (sum(v) / len(v) - mean) ** 2 for v in by_text.values())
    return between / total if total > 1e-12 else None
