"""LightningRL policy loss as "sums with global normalisers" (spec §4.3, §3.6, §9).

The trainer splits one optimisation minibatch into micro-batches (gradient accumulation, possibly across DDP
ranks). To make the result *exactly* equal to processing the whole minibatch at once, every term is written as a
sum over tokens divided by counts that describe the **whole minibatch**:

1. before the first micro-batch, the trainer calls :func:`build_normalizer` on the minibatch's per-sequence token
   counts and correctness, and all-reduces the counts across ranks (:meth:`LossNormalizer.all_reduced`);
2. for every micro-batch it calls :func:`lightningrl_loss`, whose ``loss`` is that micro-batch's contribution,
   already divided by the global counts;
3. summing the micro-batch contributions (``backward`` on each and letting gradients accumulate, DDP averaging
   included when the per-rank contribution is multiplied by the world size) gives the full-minibatch loss.

This fixes the upstream quirk of normalising per micro-batch of one sequence (spec §4.3 [ODD], Table 4).

All per-token inputs are flat: only trainable response tokens, concatenated over the micro-batch's sequences.
Shapes: ``T`` = trainable tokens in the micro-batch, ``S`` = sequences in the whole (rank-local) minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]
NLLCorrect = Literal["verifier", "reward_nonneg"]

_REDUCTIONS = ("token", "sequence")
_KL_ESTIMATORS = ("k1", "k2", "k3")
_NLL_CORRECT = ("verifier", "reward_nonneg")
# Bound on |log ratio| before exponentiating, as upstream: exp(10) ≈ 2.2e4 stays finite in fp16/bf16 arithmetic.
_LOG_RATIO_CLAMP = 10.0


@dataclass(frozen=True, eq=False)
class LossNormalizer:
    """Counts of the whole minibatch that every micro-batch contribution is divided by (spec §4.3).

    The scalar counts must be global (summed over micro-batches and DDP ranks) before the first micro-batch is
    processed; ``seq_num_tokens`` only needs to cover the sequences that ``seq_index`` refers to (rank-local).

    Args:
        num_tokens: Trainable tokens in the minibatch ("token" reduction of the policy and KL terms).
        num_sequences: Sequences with at least one trainable token ("sequence" reduction).
        seq_num_tokens: ``(S,)`` trainable tokens of each sequence, n_s; indexed by ``seq_index``.
        num_correct_tokens: Trainable tokens of verifier-correct sequences ("token" reduction of the NLL, §3.6).
        num_correct_sequences: Verifier-correct sequences with at least one trainable token.
    """

    num_tokens: float
    num_sequences: float
    seq_num_tokens: Tensor
    num_correct_tokens: float = 0.0
    num_correct_sequences: float = 0.0

    def __post_init__(self) -> None:
        # Store plain floats: they are divisors only, and a float avoids device/dtype mismatches later.
        for name in ("num_tokens", "num_sequences", "num_correct_tokens", "num_correct_sequences"):
            value = float(getattr(self, name))
            if value < 0:
                raise ValueError(f"LossNormalizer.{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)
        if self.seq_num_tokens.dim() != 1:
            raise ValueError(
                f"LossNormalizer.seq_num_tokens must be 1-D (S,), got shape {tuple(self.seq_num_tokens.shape)}"
            )
        if self.num_correct_tokens > self.num_tokens or self.num_correct_sequences > self.num_sequences:
            raise ValueError(
                "LossNormalizer: correct counts exceed totals "
                f"(tokens {self.num_correct_tokens} > {self.num_tokens} or "
                f"sequences {self.num_correct_sequences} > {self.num_sequences})"
            )

    def counts(self) -> Tensor:
        """The four scalar counts as a float64 tensor ``(4,)``, in field order (for an all-reduce)."""
        return torch.tensor(
            [self.num_tokens, self.num_sequences, self.num_correct_tokens, self.num_correct_sequences],
            dtype=torch.float64,
            device=self.seq_num_tokens.device,
        )

    def with_counts(self, counts: Tensor) -> LossNormalizer:
        """A copy whose four scalar counts come from ``counts`` ``(4,)`` (e.g. after an all-reduce)."""
        if counts.shape != (4,):
            raise ValueError(f"LossNormalizer.with_counts expects shape (4,), got {tuple(counts.shape)}")
        values = counts.detach().double().cpu().tolist()
        return replace(
            self,
            num_tokens=values[0],
            num_sequences=values[1],
            num_correct_tokens=values[2],
            num_correct_sequences=values[3],
        )

    def all_reduced(self, group: object | None = None) -> LossNormalizer:
        """Sum the scalar counts over DDP ranks; returns ``self`` when torch.distributed is not initialised."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        counts = self.counts()
        if torch.distributed.get_backend(group) == "nccl" and counts.device.type != "cuda":
            counts = counts.cuda()
        torch.distributed.all_reduce(counts, group=group)
        return self.with_counts(counts)

    def for_correct(self) -> LossNormalizer:
        """The normaliser of the NLL term: totals replaced by the correct-only counts (spec §3.6)."""
        return replace(
            self,
            num_tokens=self.num_correct_tokens,
            num_sequences=self.num_correct_sequences,
        )


def build_normalizer(seq_num_tokens: Tensor, correct_seq: Tensor) -> LossNormalizer:
    """Counts of one (rank-local) minibatch; the caller all-reduces them (:meth:`LossNormalizer.all_reduced`).

    Sequences without trainable tokens are not counted as sequences: they contribute nothing to any sum, and
    counting them would shrink the "sequence" mean.

    Args:
        seq_num_tokens: ``(S,)`` integer count of trainable tokens per sequence.
        correct_seq: ``(S,)`` bool, the sequence's response is verifier-correct (spec §3.6).

    Returns:
        The :class:`LossNormalizer` of the minibatch.
    """
    if seq_num_tokens.dim() != 1 or correct_seq.shape != seq_num_tokens.shape:
        raise ValueError(
            "build_normalizer: seq_num_tokens and correct_seq must both have shape (S,), got "
            f"{tuple(seq_num_tokens.shape)} and {tuple(correct_seq.shape)}"
        )
    if seq_num_tokens.is_floating_point() or seq_num_tokens.dtype == torch.bool:
        raise ValueError(f"build_normalizer: seq_num_tokens must be an integer tensor, got {seq_num_tokens.dtype}")
    if bool((seq_num_tokens < 0).any()):
        raise ValueError("build_normalizer: seq_num_tokens has negative entries")
    correct = correct_seq.to(torch.bool)
    has_tokens = seq_num_tokens > 0
    return LossNormalizer(
        num_tokens=int(seq_num_tokens.sum()),
        num_sequences=int(has_tokens.sum()),
        seq_num_tokens=seq_num_tokens,
        num_correct_tokens=int(seq_num_tokens[correct].sum()),
        num_correct_sequences=int((has_tokens & correct).sum()),
    )


def policy_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token PPO surrogate with DAPO-style asymmetric clipping (spec §4.3).

    ρ = exp(clamp(ℓ − ℓ_old, −10, 10)); clip(ρ) = clamp(ρ, 1−ε_low, 1+ε_high) if A ≥ 0 else
    clamp(ρ, 1−ε_low, 1+ε_low); surr = min(ρA, clip(ρ)A). The upper bound ε_high only applies to A ≥ 0, where it
    is the one that can bind; for A < 0 the symmetric clip is used, as upstream.

    Args:
        logp: ``(T,)`` log-probs under the current policy (differentiable).
        old_logp: ``(T,)`` log-probs under the rollout policy.
        advantages: ``(T,)`` sequence advantage broadcast to its tokens.
        eps_low: ε, lower clip range (and upper one for negative advantages).
        eps_high: ε_high, upper clip range for non-negative advantages.

    Returns:
        ``(surr, ratio, clipped_low, clipped_high)``, each ``(T,)`` (float32 or wider): the surrogate to maximise,
        ρ, and bool masks of tokens whose clipped branch is active and binding (zero gradient):
        low = A < 0 and ρ < 1−ε_low, high = A > 0 and ρ > 1+ε_high (TRL's ``clip_ratio/low_mean`` / ``high_mean``).
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"policy_surrogate: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    dtype = _compute_dtype(logp, old_logp)
    advantages = advantages.to(dtype)
    log_ratio = (logp.to(dtype) - old_logp.to(dtype)).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    upper = torch.where(advantages >= 0, ratio.new_tensor(1.0 + eps_high), ratio.new_tensor(1.0 + eps_low))
    clipped_ratio = torch.minimum(torch.clamp(ratio, min=1.0 - eps_low), upper)
    surr = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        clipped_low = (advantages < 0) & (ratio < 1.0 - eps_low)
        clipped_high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return surr, ratio, clipped_low, clipped_high


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL estimate to the frozen reference policy (spec §4.3), with d = ℓ − ℓ_ref.

    k1 = d; k2 = ½ d²; k3 = exp(clamp(−d, −10, 10)) − 1 + d (Schulman's unbiased, non-negative estimator).

    Args:
        logp: ``(T,)`` current log-probs (differentiable).
        ref_logp: ``(T,)`` reference log-probs.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(T,)`` KL estimate per token (float32 or wider).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    dtype = _compute_dtype(logp, ref_logp)
    d = logp.to(dtype) - ref_logp.to(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp((-d).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)) - 1.0 + d
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected one of {_KL_ESTIMATORS}")


def reduce(values: Tensor, seq_index: Tensor, mode: Reduction, norm: LossNormalizer) -> Tensor:
    """This micro-batch's share of a minibatch mean; summing shares over micro-batches gives the mean (spec §4.3).

    "token": Σ_k v_k / N_tokens.  "sequence": Σ_k v_k / n_{s(k)} / N_sequences, i.e. the mean over sequences of
    each sequence's token mean. When the normaliser counts zero tokens/sequences, the minibatch has nothing to
    average and the share is 0 (kept in the graph so every micro-batch backpropagates).

    Args:
        values: ``(T,)`` per-token values.
        seq_index: ``(T,)`` long, the minibatch index of each token's sequence (into ``norm.seq_num_tokens``).
        mode: ``"token"`` or ``"sequence"``.
        norm: Global counts of the minibatch.

    Returns:
        Scalar tensor, differentiable w.r.t. ``values``.
    """
    if mode not in _REDUCTIONS:
        raise ValueError(f"reduce: unknown mode {mode!r}; expected one of {_REDUCTIONS}")
    _check_same_shape(values=values, seq_index=seq_index)
    denominator = norm.num_tokens if mode == "token" else norm.num_sequences
    if denominator == 0:
        if values.numel() > 0:
            raise ValueError(
                f"reduce: the normaliser counts 0 {'tokens' if mode == 'token' else 'sequences'} but the "
                f"micro-batch has {values.numel()} tokens; build the normaliser from the same minibatch"
            )
        return values.sum() * 0.0
    if mode == "token":
        return values.sum() / denominator
    n_s = norm.seq_num_tokens.to(device=values.device)[seq_index.long()].to(values.dtype)
    # clamp: a token's own sequence has n_s >= 1; the clamp only protects against an inconsistent normaliser.
    return (values / n_s.clamp(min=1)).sum() / denominator


@dataclass(eq=False)
class LossStats:
    """Detached sums of one or more micro-batches; add them up, then call :meth:`metrics` (spec §4.3 logging).

    Args:
        policy: Contribution to the policy term L_pol (sums over micro-batches to the minibatch L_pol).
        kl: Contribution to the weighted KL term β·L_KL.
        nll: Contribution to the weighted NLL term μ·L_NLL.
        ratio_sum: Σ ρ_k over tokens.
        clip_low_count: Tokens whose lower clip binds.
        clip_high_count: Tokens whose upper clip binds.
        kl_sum: Σ KL_k over tokens (0 without a reference policy).
        num_tokens: Trainable tokens seen.
        nonfinite: 1.0 if any term of any micro-batch was NaN/inf, else 0.0 (the trainer skips the step).
    """

    policy: Tensor
    kl: Tensor
    nll: Tensor
    ratio_sum: Tensor
    clip_low_count: Tensor
    clip_high_count: Tensor
    kl_sum: Tensor
    num_tokens: Tensor
    nonfinite: Tensor

    def __add__(self, other: LossStats) -> LossStats:
        merged = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        merged["nonfinite"] = torch.maximum(self.nonfinite, other.nonfinite)
        return LossStats(**merged)

    def as_tensor(self) -> Tensor:
        """All fields stacked as float64 ``(9,)``, in field order, e.g. to all-reduce across ranks."""
        return torch.stack([getattr(self, f.name).detach().double() for f in fields(self)])

    @classmethod
    def from_tensor(cls, packed: Tensor) -> LossStats:
        """Inverse of :meth:`as_tensor` (after an all-reduce ``nonfinite`` counts ranks; any > 0 means skip)."""
        names = [f.name for f in fields(cls)]
        if packed.shape != (len(names),):
            raise ValueError(f"LossStats.from_tensor expects shape ({len(names)},), got {tuple(packed.shape)}")
        return cls(**dict(zip(names, packed.unbind(0), strict=True)))

    def metrics(self) -> dict[str, float]:
        """Logged keys: ``loss/policy``, ``loss/kl``, ``loss/nll``, ``clip/low``, ``clip/high``,
        ``clip/ratio_mean``, ``kl`` (mean per-token KL estimate) and ``loss/nonfinite``."""
        tokens = max(float(self.num_tokens), 1.0)
        return {
            "loss/policy": float(self.policy),
            "loss/kl": float(self.kl),
            "loss/nll": float(self.nll),
            "clip/low": float(self.clip_low_count) / tokens,
            "clip/high": float(self.clip_high_count) / tokens,
            "clip/ratio_mean": float(self.ratio_sum) / tokens,
            "kl": float(self.kl_sum) / tokens,
            "loss/nonfinite": float(self.nonfinite > 0),
        }


@dataclass(eq=False)
class LossOutput:
    """Result of :func:`lightningrl_loss` for one micro-batch.

    Args:
        loss: Scalar, differentiable: this micro-batch's share of L = L_pol + β·L_KL + μ·L_NLL.
        stats: Detached per-term contributions and statistic sums (add over micro-batches).
    """

    loss: Tensor
    stats: LossStats

    @property
    def nonfinite(self) -> bool:
        """Whether any term is NaN/inf (the trainer should skip the optimizer step; nothing is zeroed here)."""
        return bool(self.stats.nonfinite > 0)


@dataclass(frozen=True)
class LossConfig:
    """The knobs of the LightningRL loss L = L_pol + β·L_KL + μ·L_NLL (spec §4.3, §3.6, §9), ``model.init_args.loss``
    in a config. Defaults are the paper's: ε = ε_high = 0.2, k3 with β = 0.01, μ = 0.1 on verifier-correct
    responses, "Seq-Tok-Tok" reductions, no TIS. `lightningrl_loss` and `joint_step_loss` take the group whole;
    ``nll_correct`` and ``tis_cap`` say how the trainer builds their per-token ``correct_tokens`` / ``is_weights``.

    Args:
        eps_low: PPO clip ε: the ratio is clipped to [1 − ε, 1 + ε] (to 1 + ε_high above for A >= 0), in [0, 1).
        eps_high: upper clip ε_high for non-negative advantages (DAPO's clip-higher), >= 0.
        kl_beta: β of the KL penalty against the frozen reference (0: no reference model is loaded).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (Schulman's unbiased, non-negative estimator).
        nll_weight: μ of the NLL term on correct responses (0: off).
        nll_correct: which responses count as correct for the NLL: ``verifier`` (paper) or ``reward_nonneg``
            (released code's ``reward >= 0`` proxy, spec §3.6).
        policy_reduction: ``sequence`` (mean over responses of their token means) or ``token`` (mean over tokens)
            for L_pol.
        kl_reduction: ``sequence`` or ``token`` for L_KL.
        nll_reduction: ``sequence`` or ``token`` for L_NLL (over correct responses / their tokens).
        tis_cap: truncated importance sampling (verl's TIS): weight each token's policy term by
            min(π_old/π_rollout, tis_cap), π_rollout being the engine's recorded sampling probability. Off (None) by
            default: the native engine samples from the training distribution (mismatch ≈ 0). Turn it on (2.0 is
            verl's usual cap) when ``rollout/logprob_abs_diff/mean`` is well above 0, e.g. SGLang rollouts in
            bf16 on another GPU. Trajectory estimator only.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 0.01
    kl_estimator: KLEstimator = "k3"
    nll_weight: float = 0.1
    nll_correct: NLLCorrect = "verifier"
    policy_reduction: Reduction = "sequence"
    kl_reduction: Reduction = "token"
    nll_reduction: Reduction = "token"
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        # messages name the key as a config writes it (lrl.cli_errors adds the ``init_args``)
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"model.loss.eps_low must be in [0, 1) and model.loss.eps_high >= 0, got "
                             f"{self.eps_low}, {self.eps_high}")
        for name in ("kl_beta", "nll_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"model.loss.tis_cap must be > 0 (or null: off), got {self.tis_cap}")
        for name, allowed in (("kl_estimator", _KL_ESTIMATORS), ("nll_correct", _NLL_CORRECT),
                              ("policy_reduction", _REDUCTIONS), ("kl_reduction", _REDUCTIONS),
                              ("nll_reduction", _REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.loss.{name} must be one of {allowed}, got {getattr(self, name)!r}")


def lightningrl_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    seq_index: Tensor,
    norm: LossNormalizer,
    config: LossConfig = LossConfig(),
    *,
    ref_logp: Tensor | None = None,
    correct_tokens: Tensor | None = None,
    is_weights: Tensor | None = None,
) -> LossOutput:
    """One micro-batch's share of the LightningRL loss L = L_pol + β·L_KL + μ·L_NLL (spec §4.3, §3.6, §9).

    L_pol = −reduce(surr), L_KL = reduce(KL), L_NLL = reduce(−ℓ over tokens of verifier-correct responses) with
    the correct-only counts of ``norm`` (0 when the minibatch has no correct response); ε, β, μ, the KL estimator
    and the three reductions come from ``config`` (`LossConfig`: the paper's "Seq-Tok-Tok", ε = ε_high = 0.2, k3
    with β = 0.01, μ = 0.1 by default).

    Unlike upstream, a non-finite policy term is *not* replaced by 0: ``stats.nonfinite`` flags it and the trainer
    skips the optimizer step, so a diverging run is visible instead of silently training on the other terms.

    Args:
        logp: ``(T,)`` current log-probs of the trainable tokens (differentiable).
        old_logp: ``(T,)`` rollout-policy log-probs.
        advantages: ``(T,)`` sequence advantage per token.
        seq_index: ``(T,)`` long, minibatch index of each token's sequence.
        norm: Global minibatch counts from :func:`build_normalizer` (all-reduced by the caller).
        config: the loss knobs (`LossConfig`).
        ref_logp: ``(T,)`` reference log-probs; required when ``config.kl_beta > 0``, else only logged if given.
        correct_tokens: ``(T,)`` bool, token belongs to a correct response (``config.nll_correct``); required when
            ``config.nll_weight > 0``.
        is_weights: ``(T,)`` detached per-token weights of the policy term, e.g. truncated importance sampling
            min(π_old/π_rollout, ``config.tis_cap``) when rollouts came from another engine (verl's TIS); None = 1.

    Returns:
        :class:`LossOutput` with the differentiable ``loss`` and detached ``stats``.
    """
    c = config
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, seq_index=seq_index)
    if logp.dim() != 1:
        raise ValueError(f"lightningrl_loss: per-token inputs must be flat (T,), got shape {tuple(logp.shape)}")
    if c.kl_beta > 0 and ref_logp is None:
        raise ValueError(f"lightningrl_loss: kl_beta={c.kl_beta} > 0 needs ref_logp")
    if c.nll_weight > 0 and correct_tokens is None:
        raise ValueError(f"lightningrl_loss: nll_weight={c.nll_weight} > 0 needs correct_tokens")

    surr, ratio, clipped_low, clipped_high = policy_surrogate(logp, old_logp, advantages, c.eps_low, c.eps_high)
    if is_weights is not None:
        _check_same_shape(logp=logp, is_weights=is_weights)
        surr = surr * is_weights.detach().to(surr.dtype)
    policy = -reduce(surr, seq_index, c.policy_reduction, norm)

    zero = logp.sum() * 0.0  # keeps every term in the graph, so each micro-batch backpropagates into the model
    kl_term = zero
    kl_sum = torch.zeros((), dtype=torch.float64, device=logp.device)
    if ref_logp is not None:
        kl_tokens = kl_penalty(logp, ref_logp, c.kl_estimator)
        kl_sum = kl_tokens.detach().double().sum()
        if c.kl_beta > 0:
            kl_term = c.kl_beta * reduce(kl_tokens, seq_index, c.kl_reduction, norm)

    nll_term = zero
    if c.nll_weight > 0:
        _check_same_shape(logp=logp, correct_tokens=correct_tokens)
        correct = correct_tokens.to(device=logp.device, dtype=torch.bool)
        nll_norm = norm.for_correct()
        # 0 when the whole minibatch has no correct response (spec §3.6); reduce() returns 0 for empty input.
        nll_term = c.nll_weight * reduce(-logp[correct], seq_index[correct], c.nll_reduction, nll_norm)

    loss = policy + kl_term + nll_term
    stats = LossStats(
        policy=policy.detach().double(),
        kl=kl_term.detach().double(),
        nll=nll_term.detach().double(),
        ratio_sum=ratio.detach().double().sum(),
        clip_low_count=clipped_low.sum().double(),
        clip_high_count=clipped_high.sum().double(),
        kl_sum=kl_sum,
        num_tokens=torch.tensor(float(logp.numel()), dtype=torch.float64, device=logp.device),
        nonfinite=(~torch.isfinite(loss.detach())).double(),
    )
    return LossOutput(loss=loss, stats=stats)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32: log-ratios of bf16/fp16 log-probs lose most of their precision (spec §4.4 [ODD])."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_same_shape(**tensors: Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor whose shape differs from the first one's."""
    items = [(name, t) for name, t in tensors.items()]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor is None:
            raise ValueError(f"{name} is required")
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but {first_name} has {tuple(first.shape)}; "
                "all per-token inputs must be flat (T,) tensors over the same tokens"
            )
