"""Tests of lrl.algorithms.losses (spec §4.3): hand-computed values and micro-batch invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lrl.algorithms.losses import (
    LossConfig,
    LossNormalizer,
    LossStats,
    build_normalizer,
    kl_penalty,
    lightningrl_loss,
    policy_surrogate,
    reduce,
)

DT = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


# ---------------------------------------------------------------------------------------------------------------
# policy_surrogate
# ---------------------------------------------------------------------------------------------------------------


def test_surrogate_clipping_both_signs_asymmetric_eps() -> None:
    # eps_low = 0.2, eps_high = 0.3: A >= 0 clips to [0.8, 1.3], A < 0 clips to [0.8, 1.2].
    ratios = [1.5, 1.25, 0.5, 0.5, 1.25, 1.1, 1.5]
    advs = [1.0, 2.0, 1.0, -1.0, -1.0, -2.0, 0.0]
    logp = torch.log(t(*ratios))
    old = torch.zeros(len(ratios), dtype=DT)
    surr, ratio, low, high = policy_surrogate(logp, old, t(*advs), eps_low=0.2, eps_high=0.3)
    expected = [
        1.3,  # ρ=1.5, A=+1: min(1.5·1, 1.3·1) = 1.3          high clip binds
        2.5,  # ρ=1.25, A=+2: 1.25 < 1.3 so clip = 1.25 → 2.5    not binding (ε_high, not ε, applies)
        0.5,  # ρ=0.5, A=+1: min(0.5, 0.8) = 0.5                 lower clip active but not binding
        -0.8,  # ρ=0.5, A=−1: min(−0.5, −0.8) = −0.8            low clip binds
        -1.25,  # ρ=1.25, A=−1: clip = 1.2, min(−1.25, −1.2) = −1.25  upper clip active, not binding
        -2.2,  # ρ=1.1, A=−2: inside [0.8, 1.2], −2.2
        0.0,  # A = 0: surrogate 0
    ]
    torch.testing.assert_close(surr, t(*expected))
    torch.testing.assert_close(ratio, t(*ratios))
    assert low.tolist() == [False, False, False, True, False, False, False]
    assert high.tolist() == [True, False, False, False, False, False, False]


def test_surrogate_gradient_zero_where_clip_binds() -> None:
    logp = torch.log(t(1.5, 1.1)).requires_grad_()
    surr, *_ = policy_surrogate(logp, torch.zeros(2, dtype=DT), t(1.0, 1.0), eps_low=0.2, eps_high=0.2)
    surr.sum().backward()
    # d(ρA)/dℓ = ρA: token 0 is clipped (1.5 > 1.2) → 0; token 1 unclipped → 1.1.
    torch.testing.assert_close(logp.grad, t(0.0, 1.1))


def test_surrogate_log_ratio_is_clamped() -> None:
    surr, ratio, _, _ = policy_surrogate(t(50.0), t(0.0), t(-1.0), 0.2, 0.2)
    # ℓ−ℓ_old = 50 is clamped to 10: ρ = e^10, A<0 → min(−e^10, −1.2) = −e^10.
    torch.testing.assert_close(ratio, t(math.exp(10)))
    torch.testing.assert_close(surr, t(-math.exp(10)))


def test_surrogate_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="advantages"):
        policy_surrogate(t(0.0, 0.0), t(0.0, 0.0), t(1.0), 0.2, 0.2)


# ---------------------------------------------------------------------------------------------------------------
# kl_penalty
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        # d = ℓ − ℓ_ref ∈ {0.5, −1}
        ("k1", [0.5, -1.0]),  # d
        ("k2", [0.125, 0.5]),  # ½·0.25, ½·1
        ("k3", [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]),  # 0.10653..., 0.71828...
    ],
)
def test_kl_estimators(estimator: str, expected: list[float]) -> None:
    logp = t(0.5, -1.0)
    ref = t(0.0, 0.0)
    torch.testing.assert_close(kl_penalty(logp, ref, estimator), t(*expected))


def test_kl_k3_hand_numbers() -> None:
    # e^−0.5 = 0.6065306597 → 0.6065306597 − 1 + 0.5 = 0.1065306597; e^1 − 1 − 1 = 0.7182818285
    torch.testing.assert_close(kl_penalty(t(0.5, -1.0), t(0.0, 0.0), "k3"), t(0.1065306597, 0.7182818285))


def test_kl_unknown_estimator() -> None:
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(t(0.0), t(0.0), "k4")


# ---------------------------------------------------------------------------------------------------------------
# reduce
# ---------------------------------------------------------------------------------------------------------------


def _two_seq_norm() -> LossNormalizer:
    # sequence 0 has 1 token, sequence 1 has 3 tokens
    return build_normalizer(torch.tensor([1, 3]), torch.tensor([True, False]))


def test_reduce_token_vs_sequence() -> None:
    values = t(4.0, 1.0, 2.0, 6.0)
    seq_index = torch.tensor([0, 1, 1, 1])
    norm = _two_seq_norm()
    # token: (4 + 1 + 2 + 6) / 4 = 13/4 = 3.25
    torch.testing.assert_close(reduce(values, seq_index, "token", norm), t(3.25)[0])
    # sequence: (4/1 + (1+2+6)/3) / 2 = (4 + 3) / 2 = 3.5
    torch.testing.assert_close(reduce(values, seq_index, "sequence", norm), t(3.5)[0])


def test_reduce_unknown_mode_and_inconsistent_normaliser() -> None:
    norm = _two_seq_norm()
    with pytest.raises(ValueError, match="mode"):
        reduce(t(1.0), torch.tensor([0]), "batch", norm)
    empty = LossNormalizer(num_tokens=0, num_sequences=0, seq_num_tokens=torch.tensor([0]))
    with pytest.raises(ValueError, match="0 tokens"):
        reduce(t(1.0), torch.tensor([0]), "token", empty)


def test_build_normalizer_counts() -> None:
    norm = build_normalizer(torch.tensor([2, 0, 3, 5]), torch.tensor([True, True, False, True]))
    assert norm.num_tokens == 10  # 2+0+3+5
    assert norm.num_sequences == 3  # the empty sequence is not counted
    assert norm.num_correct_tokens == 7  # 2 + 0 + 5
    assert norm.num_correct_sequences == 2  # sequences 0 and 3 (1 is empty)
    back = norm.with_counts(norm.counts())
    assert (back.num_tokens, back.num_sequences, back.num_correct_tokens, back.num_correct_sequences) == (
        10,
        3,
        7,
        2,
    )
    assert norm.all_reduced() is norm  # no process group: unchanged
    with pytest.raises(ValueError, match="integer"):
        build_normalizer(torch.tensor([1.0]), torch.tensor([True]))


# ---------------------------------------------------------------------------------------------------------------
# lightningrl_loss
# ---------------------------------------------------------------------------------------------------------------


def test_nll_only_on_correct_tokens() -> None:
    # sequence 0 (2 tokens) correct, sequence 1 (1 token) wrong. On-policy (ρ=1), A=0 → policy term 0, no KL.
    logp = t(-1.0, -3.0, -10.0).requires_grad_()
    seq_index = torch.tensor([0, 0, 1])
    norm = build_normalizer(torch.tensor([2, 1]), torch.tensor([True, False]))
    correct = torch.tensor([True, True, False])
    for reduction, expected in [
        ("token", 0.1 * (1.0 + 3.0) / 2),  # μ · mean over 2 correct tokens of −ℓ = 0.1·2 = 0.2
        ("sequence", 0.1 * ((1.0 + 3.0) / 2) / 1),  # μ · (per-seq mean 2) / 1 correct sequence = 0.2
    ]:
        out = lightningrl_loss(
            logp,
            logp.detach(),
            torch.zeros(3, dtype=DT),
            seq_index,
            norm,
            LossConfig(kl_beta=0.0, nll_weight=0.1, nll_reduction=reduction),
            correct_tokens=correct,
        )
        torch.testing.assert_close(out.loss, t(expected)[0])
        torch.testing.assert_close(out.stats.nll, t(expected)[0])
        logp.grad = None
        out.loss.backward()
        # d/dℓ of 0.1·(−ℓ0 − ℓ1)/2 = −0.05 on correct tokens, 0 on the wrong one.
        torch.testing.assert_close(logp.grad, t(-0.05, -0.05, 0.0))


def test_nll_zero_without_correct() -> None:
    logp = t(-1.0, -2.0).requires_grad_()
    norm = build_normalizer(torch.tensor([2]), torch.tensor([False]))
    out = lightningrl_loss(
        logp,
        logp.detach(),
        t(0.0, 0.0),
        torch.tensor([0, 0]),
        norm,
        LossConfig(kl_beta=0.0),
        correct_tokens=torch.tensor([False, False]),
    )
    assert float(out.stats.nll) == 0.0
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()  # still connected to the graph
    torch.testing.assert_close(logp.grad, t(0.0, 0.0))


def test_full_loss_hand_computed() -> None:
    # Two sequences: s0 = 1 token (correct, A=+1), s1 = 2 tokens (wrong, A=−1). ε = ε_high = 0.2.
    # ρ = [1.5, 0.5, 1.0]; ℓ = log ρ (old = 0); ref = 0 so d = ℓ.
    logp = torch.log(t(1.5, 0.5, 1.0))
    seq_index = torch.tensor([0, 1, 1])
    norm = build_normalizer(torch.tensor([1, 2]), torch.tensor([True, False]))
    out = lightningrl_loss(
        logp,
        torch.zeros(3, dtype=DT),
        t(1.0, -1.0, -1.0),
        seq_index,
        norm,
        LossConfig(kl_beta=0.01, kl_estimator="k1", nll_weight=0.1),
        ref_logp=torch.zeros(3, dtype=DT),
        correct_tokens=torch.tensor([True, False, False]),
    )
    # surr = [min(1.5, 1.2) = 1.2, min(−0.5, −0.8) = −0.8, −1.0]
    # L_pol ("sequence") = −(1.2/1 + (−0.8 − 1.0)/2) / 2 = −(1.2 − 0.9)/2 = −0.15
    # KL k1 ("token") = β · (log1.5 + log0.5 + 0)/3 = 0.01 · log(0.75)/3
    # NLL ("token") = μ · (−log 1.5)/1
    pol = -0.15
    kl = 0.01 * math.log(0.75) / 3
    nll = 0.1 * -math.log(1.5)
    torch.testing.assert_close(out.stats.policy, t(pol)[0])
    torch.testing.assert_close(out.stats.kl, t(kl)[0])
    torch.testing.assert_close(out.stats.nll, t(nll)[0])
    torch.testing.assert_close(out.loss, t(pol + kl + nll)[0])
    metrics = out.stats.metrics()
    assert metrics["clip/low"] == pytest.approx(1 / 3)  # token 1: A<0, ρ=0.5 < 0.8
    assert metrics["clip/high"] == pytest.approx(1 / 3)  # token 0: A>0, ρ=1.5 > 1.2
    assert metrics["clip/ratio_mean"] == pytest.approx(1.0)  # (1.5 + 0.5 + 1.0)/3
    assert metrics["kl"] == pytest.approx(math.log(0.75) / 3)
    assert metrics["loss/nonfinite"] == 0.0
    assert not out.nonfinite


def test_nonfinite_is_flagged_not_zeroed() -> None:
    norm = build_normalizer(torch.tensor([1]), torch.tensor([False]))
    out = lightningrl_loss(
        t(float("nan")), t(0.0), t(1.0), torch.tensor([0]), norm, LossConfig(kl_beta=0.0),
        correct_tokens=torch.tensor([False]),
    )
    assert out.nonfinite
    assert math.isnan(float(out.loss))


def test_missing_inputs_raise() -> None:
    norm = build_normalizer(torch.tensor([1]), torch.tensor([False]))
    args = (t(0.0), t(0.0), t(1.0), torch.tensor([0]), norm)
    with pytest.raises(ValueError, match="ref_logp"):
        lightningrl_loss(*args, correct_tokens=torch.tensor([False]))
    with pytest.raises(ValueError, match="correct_tokens"):
        lightningrl_loss(*args, ref_logp=t(0.0))


# ---------------------------------------------------------------------------------------------------------------
# The key property: micro-batch contributions sum to the full-minibatch loss and gradient
# ---------------------------------------------------------------------------------------------------------------


def _minibatch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([2, 5, 3])  # 3 sequences of different lengths
    seq_index = torch.repeat_interleave(torch.arange(3), lengths)
    n = int(lengths.sum())
    return {
        "lengths": lengths,
        "seq_index": seq_index,
        "logp": -torch.rand(n, generator=g, dtype=DT) * 3,
        "old_logp": -torch.rand(n, generator=g, dtype=DT) * 3,  # ratios far from 1: clipping active
        "ref_logp": -torch.rand(n, generator=g, dtype=DT) * 3,
        "advantages": torch.tensor([1.3, -0.7, 0.4], dtype=DT)[seq_index],
        "correct_seq": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize(("policy_red", "kl_red", "nll_red"), list(itertools.product(("token", "sequence"), repeat=3)))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_micro_batches_sum_to_full_batch(policy_red: str, kl_red: str, nll_red: str, estimator: str) -> None:
    mb = _minibatch()
    norm = build_normalizer(mb["lengths"], mb["correct_seq"])
    config = LossConfig(
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=0.05,
        kl_estimator=estimator,
        nll_weight=0.1,
        policy_reduction=policy_red,
        kl_reduction=kl_red,
        nll_reduction=nll_red,
    )

    def run(token_mask: torch.Tensor, logp: torch.Tensor):
        return lightningrl_loss(
            logp[token_mask],
            mb["old_logp"][token_mask],
            mb["advantages"][token_mask],
            mb["seq_index"][token_mask],
            norm,
            config,
            ref_logp=mb["ref_logp"][token_mask],
            correct_tokens=mb["correct_seq"][mb["seq_index"]][token_mask],
        )

    # full minibatch at once
    logp_full = mb["logp"].clone().requires_grad_()
    full = run(torch.ones_like(mb["seq_index"], dtype=torch.bool), logp_full)
    full.loss.backward()

    # micro-batches [seq 0] and [seq 1, seq 2], gradients accumulated
    logp_micro = mb["logp"].clone().requires_grad_()
    total = torch.zeros((), dtype=DT)
    stats: LossStats | None = None
    for seqs in ([0], [1, 2]):
        mask = torch.isin(mb["seq_index"], torch.tensor(seqs))
        out = run(mask, logp_micro)
        out.loss.backward()
        total = total + out.loss.detach()
        stats = out.stats if stats is None else stats + out.stats

    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(logp_micro.grad, logp_full.grad)
    assert stats is not None
    for key, value in stats.metrics().items():
        assert value == pytest.approx(full.stats.metrics()[key]), key
    # sanity: the gradient is not trivially zero and sequence/token modes really differ on this data
    assert logp_full.grad.abs().sum() > 0


def test_token_and_sequence_policy_differ() -> None:
    mb = _minibatch()
    norm = build_normalizer(mb["lengths"], mb["correct_seq"])
    losses = [
        lightningrl_loss(
            mb["logp"],
            mb["old_logp"],
            mb["advantages"],
            mb["seq_index"],
            norm,
            LossConfig(kl_beta=0.0, nll_weight=0.0, policy_reduction=mode),
        ).loss
        for mode in ("token", "sequence")
    ]
    assert not torch.allclose(losses[0], losses[1])


def test_loss_stats_pack_roundtrip() -> None:
    mb = _minibatch()
    norm = build_normalizer(mb["lengths"], mb["correct_seq"])
    out = lightningrl_loss(
        mb["logp"],
        mb["old_logp"],
        mb["advantages"],
        mb["seq_index"],
        norm,
        ref_logp=mb["ref_logp"],
        correct_tokens=mb["correct_seq"][mb["seq_index"]],
    )
    back = LossStats.from_tensor(out.stats.as_tensor())
    assert back.metrics() == pytest.approx(out.stats.metrics())


def test_low_precision_inputs_computed_in_float32() -> None:
    # bf16 log-probs: the log-ratio is taken in float32 and the gradient still reaches the bf16 leaf.
    logp = torch.tensor([-1.0, -2.0], dtype=torch.bfloat16, requires_grad=True)
    norm = build_normalizer(torch.tensor([2]), torch.tensor([True]))
    out = lightningrl_loss(
        logp,
        torch.tensor([-1.0, -2.0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([0, 0]),
        norm,
        ref_logp=torch.tensor([-1.0, -2.0]),
        correct_tokens=torch.tensor([True, True]),
    )
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert logp.grad is not None and logp.grad.dtype == torch.bfloat16


def test_loss_config_refuses_bad_knobs_naming_the_key() -> None:
    """The group checks its own ranges, naming the key as a config writes it (`lrl.cli_errors` adds init_args)."""
    for kwargs, key in [({"eps_low": 1.0}, "model.loss.eps_low"), ({"eps_high": -0.1}, "model.loss.eps_high"),
                        ({"kl_beta": -0.01}, "model.loss.kl_beta"), ({"nll_weight": -1.0}, "model.loss.nll_weight"),
                        ({"tis_cap": 0.0}, "model.loss.tis_cap"), ({"kl_estimator": "k4"}, "model.loss.kl_estimator"),
                        ({"nll_reduction": "mean"}, "model.loss.nll_reduction"),
                        ({"nll_correct": "all"}, "model.loss.nll_correct")]:
        with pytest.raises(ValueError, match=key):
            LossConfig(**kwargs)
    # the paper's knobs are the defaults (spec §9)
    assert LossConfig() == LossConfig(eps_low=0.2, eps_high=0.2, kl_beta=0.01, kl_estimator="k3", nll_weight=0.1,
                                      nll_correct="verifier", policy_reduction="sequence", kl_reduction="token",
                                      nll_reduction="token", tis_cap=None)
