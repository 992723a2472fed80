"""The shared decoding step: `sample_tokens` (sampling + confidence) and `select_unmask` (spec §2.2–§2.3)."""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.unmasking import sample_tokens, select_unmask

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


def _sel(conf, masked, **kw):
    return select_unmask(torch.tensor(conf), torch.tensor(masked), **kw).tolist()


# ---------------------------------------------------------------------------------------------- select_unmask
def test_dynamic_takes_best_plus_all_above_threshold():
    conf = [[0.20, 0.95, 0.50, 0.91], [0.20, 0.30, 0.10, 0.25]]
    masked = [[True] * 4, [True] * 4]
    got = _sel(conf, masked, strategy="low_confidence_dynamic", threshold=0.9)
    assert got == [[False, True, False, True], [False, True, False, False]]  # row 2: none ≥ φ, so only the best


def test_dynamic_threshold_is_inclusive():
    got = _sel([[0.9, 0.5, 0.1]], [[True] * 3], strategy="low_confidence_dynamic", threshold=0.5)
    assert got == [[True, True, False]]


def test_dynamic_threshold_zero_unmasks_every_masked_position():
    conf = [[0.0, 0.3, 0.0, 0.7], [0.1, 0.0, 0.2, 0.0]]
    masked = [[True, True, False, True], [False, False, False, False]]
    got = _sel(conf, masked, strategy="low_confidence_dynamic", threshold=0.0)
    assert got == masked


def test_dynamic_threshold_one_unmasks_exactly_one_unless_certain():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(64, 8, generator=g) * 0.999
    masked = torch.rand(64, 8, generator=g) < 0.6
    chosen = select_unmask(conf, masked, strategy="low_confidence_dynamic", threshold=1.0)
    assert torch.equal(chosen.sum(1), masked.any(1).long())
    assert not (chosen & ~masked).any()
    best = torch.where(masked, conf, -1.0).argmax(1)
    rows = masked.any(1).nonzero().flatten()
    assert chosen[rows, best[rows]].all()
    # a confidence of exactly 1 reaches the threshold, so every certain position goes too
    got = _sel([[1.0, 0.2, 1.0, 0.4]], [[True] * 4], strategy="low_confidence_dynamic", threshold=1.0)
    assert got == [[True, False, True, False]]


def test_dynamic_ignores_confident_unmasked_positions():
    got = _sel([[0.10, 0.99, 0.30, 0.95]], [[True, False, True, False]], strategy="low_confidence_dynamic",
               threshold=0.9)
    assert got == [[False, False, True, False]]


def test_static_top_k():
    conf = [[0.2, 0.9, 0.5, 0.7], [0.2, 0.9, 0.5, 0.7]]
    masked = [[True, True, True, True], [True, False, True, True]]
    got = _sel(conf, masked, strategy="low_confidence_static", k=2)
    assert got == [[False, True, False, True], [False, False, True, True]]


def test_static_k_larger_than_masked_takes_all_masked():
    masked = [[True, False, True, False], [False, False, False, False]]
    got = _sel([[0.1, 0.9, 0.2, 0.8], [0.5, 0.5, 0.5, 0.5]], masked, strategy="low_confidence_static", k=8)
    assert got == masked


def test_sequential_left_to_right():
    masked = [[False, True, True, True, True], [True, False, True, False, False], [False] * 5]
    conf = [[0.0, 0.1, 0.9, 0.9, 0.9], [0.9] * 5, [0.9] * 5]  # confidence does not matter
    got = _sel(conf, masked, strategy="sequential", k=2)
    assert got == [[False, True, True, False, False], [True, False, True, False, False], [False] * 5]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("k", [1, 3])
def test_selection_is_a_nonempty_subset_of_masked(strategy, k):
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(200, 8, generator=g)
    masked = torch.rand(200, 8, generator=g) < 0.5
    chosen = select_unmask(conf, masked, strategy=strategy, threshold=0.8, k=k)
    assert chosen.dtype == torch.bool and chosen.shape == masked.shape
    assert not (chosen & ~masked).any()
    assert torch.equal(chosen.any(1), masked.any(1))
    if strategy != "low_confidence_dynamic":
        assert torch.equal(chosen.sum(1), masked.sum(1).clamp(max=k))


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="remasking strategy"):
        select_unmask(torch.rand(1, 4), torch.ones(1, 4, dtype=torch.bool), strategy="random")


# ---------------------------------------------------------------------------------------------- sample_tokens
def _logits(m=32, v=50, seed=0):
    return torch.randn(m, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_softmax_confidence():
    logits = _logits()
    tok, conf = sample_tokens(logits, greedy=True, temperature=0.3, top_k=5, top_p=0.5)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(conf, logits.softmax(-1).max(-1).values)  # T = 1 for the confidence


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_one_equals_argmax(temperature):
    logits = _logits()
    tok, conf = sample_tokens(logits, greedy=False, temperature=temperature, top_k=1,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(conf, (logits / temperature).softmax(-1).max(-1).values)


def test_tiny_top_p_equals_argmax():
    logits = _logits()
    tok, _ = sample_tokens(logits, greedy=False, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.8)])
def test_confidence_is_pre_truncation_probability(top_k, top_p):
    logits, t = _logits(), 0.8
    tok, conf = sample_tokens(logits, greedy=False, temperature=t, top_k=top_k, top_p=top_p,
                              generator=torch.Generator().manual_seed(2))
    probs = (logits / t).softmax(-1)
    torch.testing.assert_close(conf, probs.gather(1, tok[:, None]).squeeze(1))
    if top_k:
        assert (probs.gather(1, tok[:, None]) >= probs.topk(top_k, -1).values[:, -1:]).all()


def test_samples_stay_inside_top_k_and_nucleus():
    logits = _logits(m=8, v=20, seed=3).repeat(100, 1)
    gen = torch.Generator().manual_seed(4)
    tok, _ = sample_tokens(logits, greedy=False, top_k=3, generator=gen)
    assert (logits.gather(1, tok[:, None]) >= logits.topk(3, -1).values[:, -1:]).all()
    tok, _ = sample_tokens(logits, greedy=False, top_p=0.5, generator=gen)
    probs = logits.softmax(-1)
    # a drawn token's rank r must have cumulative mass before it < top_p
    order = probs.argsort(-1, descending=True)
    rank = (order == tok[:, None]).float().argmax(-1)
    before = probs.sort(-1, descending=True).values.cumsum(-1).gather(1, rank[:, None]).squeeze(1) - \
        probs.gather(1, tok[:, None]).squeeze(1)
    assert (before < 0.5).all()


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    tok, _ = sample_tokens(logits, greedy=False, temperature=2.0, generator=torch.Generator().manual_seed(5))
    freq = torch.bincount(tok, minlength=3).float() / len(tok)
    torch.testing.assert_close(freq, (logits[0] / 2.0).softmax(-1), atol=0.03, rtol=0)


def test_same_generator_seed_same_samples():
    logits = _logits()
    a, _ = sample_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(9))
    b, _ = sample_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(9))
    c, _ = sample_tokens(logits, greedy=False, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_keyed_draws_are_a_pure_function_of_their_keys_and_sample_the_distribution():
    """Keys: equal inputs give equal keys, any changed coordinate a different one; Gumbel-max over keyed uniforms
    draws each token with its probability (chi-square-free check: 40k draws of a 4-way distribution, ±1.5 %)."""
    from lrl.rollout.unmasking import draw_keys, keyed_uniform, row_keys, step_keys

    rows, steps, offs = torch.tensor([0, 1, 0, 0]), torch.tensor([1, 1, 2, 1]), torch.tensor([0, 0, 0, 3])
    k = draw_keys(7, rows, steps, offs)
    assert len(set(k.tolist())) == 4 and torch.equal(k, draw_keys(7, rows, steps, offs))
    assert not torch.equal(k, draw_keys(8, rows, steps, offs))
    assert torch.equal(k, step_keys(row_keys(7, rows), steps, offs))
    assert not torch.equal(k, draw_keys(7, rows, steps, offs, stream=1))
    u = keyed_uniform(k, 5)
    assert u.shape == (4, 5) and bool(((u > 0) & (u < 1)).all())
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    keys = draw_keys(3, torch.arange(n), torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    tok, _ = sample_tokens(p.log().expand(n, 4), greedy=False, keys=keys)
    freq = torch.bincount(tok, minlength=4).float() / n
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
