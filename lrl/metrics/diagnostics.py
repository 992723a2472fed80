"""Rollout diagnostics: does a batch give the TPF reward anything to select? (issue #12)

Logged every RL step from the rollouts as drawn (before group filtering), because the measurements that explained
the weak single-style results were exactly these: identical texts inside a group, a tiny within-group TPF spread,
and the forwards a response costs (a TPF gain bought with longer answers shows up there, not in TPF).
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

    Returns:
        ``rollout/distinct_texts_per_group`` (mean number of different texts in a group),
        ``rollout/identical_groups`` (fraction of groups whose responses are all the same text),
        ``rollout/tpf_std_in_group`` (mean over groups of the population std of TPF),
        ``rollout/forwards_per_response`` and ``rollout/tokens_per_response`` (means over responses),
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
    if styles is not None:
        counts = Counter(styles)
        for name in (*style_names, *sorted(set(counts) - set(style_names))):
            out[f"style/{name}"] = counts.get(name, 0) / n
        out["rollout/mixed_style_groups"] = sum(len({styles[i] for i in rows}) > 1 for rows in groups) / len(groups)
    return out
