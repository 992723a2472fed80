"""The decoding step shared by every engine: sample tokens, score confidence, choose positions to unmask.

These pure functions are imported both by the native engine and by the SGLang plugin, so the two can never
drift (spec §2.2–§2.3). Shapes: A rows, T block positions, V vocabulary.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^27, so a 32-bit value times it stays inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _M32
    return x ^ (x >> 16)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The 32-bit key of each request row (prompt index × G + sample) of a rollout seeded with ``seed``.

    A server that decodes rows as separate requests (the SGLang plugin) receives this key as the request's seed and
    continues with `step_keys`, so its draws equal the native engine's.
    """
    s = torch.as_tensor(((seed & _M32) ^ (seed >> 32 & _M32)) & _M32, device=rows.device)
    return _mix32(_mix32(s.expand_as(rows)) ^ rows.long())


def step_keys(keys: torch.Tensor, steps: torch.Tensor, offsets: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Keys of the draws at (row key, the row's denoising step, block offset); ``stream`` separates independent
    uses (tokens 0, the planner's Bernoulli draws 1). Int64 in [0, 2^32)."""
    k = _mix32(keys ^ steps.long())
    if stream:
        k = _mix32(k ^ (stream * 0x9E3779B9 & _M32))
    return _mix32(k ^ offsets.long())


def draw_keys(seed: int, rows: torch.Tensor, steps: torch.Tensor, offsets: torch.Tensor, stream: int = 0):
    """Keys of the random draws of a rollout, one per (row, denoising step, block offset), any matching shapes.

    A draw depends only on the request's seed, the row (prompt index × G + sample), the row's own step count and
    the position in its block: never on which other rows share the forward, how many there are, or whether the
    row was decoded before and restarted. So continuous batching, chunking and preemption cannot change a sample.
    Returns int64 keys in [0, 2^32) (`row_keys`, then `step_keys`).
    """
    return step_keys(row_keys(seed, rows), steps, offsets, stream)


def keyed_uniform(keys: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Uniforms in (0, 1), float32, a pure function of the keys: (M,) keys give (M,), or (M, n) with ``n``."""
    x = keys if n is None else _mix32(keys[:, None] ^ _mix32(torch.arange(n, device=keys.device) + 0x51ED27))
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


def support_mask(scaled: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor | None:
    """Tokens kept by top-k, then top-p (nucleus), of tempered logits; None when neither is on.

    Shared by sampling and by the training log-probs (`lrl.algorithms.logprobs`), so both use one support.

    Args:
        scaled: (M, V) logits already divided by the temperature.
        top_k: keep the k largest (0 = off); top_p: keep the smallest prefix of mass >= top_p (1 = off).
    Returns:
        (M, V) bool or None.
    """
    keep = None
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        keep = scaled >= kth
    if top_p < 1.0:
        filtered = scaled if keep is None else scaled.masked_fill(~keep, float("-inf"))
        sorted_logits, order = torch.sort(filtered, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching mass top_p
        nucleus = torch.empty_like(drop).scatter_(-1, order, ~drop)
        keep = nucleus if keep is None else keep & nucleus
    return keep


def sample_tokens(
    logits: torch.Tensor,
    *,
    greedy: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    with_logprobs: bool = False,
    keys: torch.Tensor | None = None,
):
    """Draw one token per position and its confidence.

    Args:
        logits: (M, V) logits of the positions to fill.
        greedy: argmax decoding; the confidence is then the softmax probability at T = 1 (lmdeploy forces T = 1).
        temperature, top_k, top_p: sampling controls (top_k 0 and top_p 1 switch them off).
        generator: random source (seeded by the caller for reproducibility).
        with_logprobs: also return the sampling log-probability of each drawn token.
        keys: (M,) int64 `draw_keys` of the positions: the draw is the Gumbel-max of the processed distribution
            with `keyed_uniform` noise (an exact sample of it, a pure function of the keys), instead of
            ``torch.multinomial`` with ``generator``.
    Returns:
        tokens (M,) long, confidence (M,) float: probability of the drawn token under softmax(logits / T), before
        top-k/top-p truncation (spec §2.3); with ``with_logprobs`` a third (M,) float: the log-probability the
        token was drawn with (tempered, top-k/top-p renormalised; greedy: the plain log-softmax at T = 1).
    """
    logits = logits.float()
    if greedy:
        conf, tokens = logits.softmax(-1).max(-1)
        if not with_logprobs:
            return tokens, conf
        return tokens, conf, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature
    probs = scaled.softmax(-1)
    keep = support_mask(scaled, top_k=top_k, top_p=top_p)
    filtered = scaled if keep is None else scaled.masked_fill(~keep, float("-inf"))
    if keys is not None:
        gumbel = -torch.log(-torch.log(keyed_uniform(keys, scaled.shape[-1])))
        tokens = (filtered + gumbel).argmax(-1)
    else:
        sample_probs = probs if keep is None else filtered.softmax(-1)
        tokens = torch.multinomial(sample_probs, 1, generator=generator).squeeze(-1)
    conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    if not with_logprobs:
        return tokens, conf
    logp = filtered.gather(-1, tokens[:, None]).squeeze(-1) - filtered.logsumexp(-1)
    return tokens, conf, logp


def select_unmask(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    *,
    strategy: str,
    threshold: float = 0.9,
    k: int = 1,
) -> torch.Tensor:
    """Which masked positions to unmask this step (spec §2.2).

    Args:
        confidence: (A, T) confidence of the drawn token at each position (ignored where not masked).
        masked: (A, T) bool, positions still masked.
        strategy: ``low_confidence_dynamic``: the most confident masked position plus every masked position with
            confidence >= threshold; ``low_confidence_static``: the k most confident; ``sequential``: the first k
            masked positions left to right.
        threshold: dynamic threshold φ.
        k: tokens per step of the static and sequential strategies.
    Returns:
        (A, T) bool, a subset of ``masked``; at least one position in every row that has a masked position.
    """
    neg = torch.finfo(confidence.dtype).min if confidence.is_floating_point() else -1
    conf = torch.where(masked, confidence, torch.full_like(confidence, neg))
    any_masked = masked.any(-1, keepdim=True)
    if strategy == "low_confidence_dynamic":
        best = torch.zeros_like(masked).scatter(-1, conf.argmax(-1, keepdim=True), True)
        chosen = (masked & (conf >= threshold)) | (best & any_masked)
    elif strategy == "low_confidence_static":
        n = masked.sum(-1, keepdim=True).clamp(max=k)
        ranks = conf.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        chosen = masked & (ranks < n)
    elif strategy == "sequential":
        order = masked.long().cumsum(-1)
        chosen = masked & (order <= k)
    else:
        raise ValueError(f"unknown remasking strategy {strategy!r}")
    return chosen


def planner_logprob(plan_logits: torch.Tensor, masked: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Log-probability of one step's unmasking decisions under the `planner_decisions` rule (spec §8.3).

    Σ_{i∈M} [u_i log p_i + (1 − u_i) log(1 − p_i)] with p = sigmoid(plan_logits), u = chosen, M = masked. The
    at-least-one rule makes "only argmax_M p" also the outcome of drawing nothing, so for that decision the
    probability of the empty draw, Π_{i∈M} (1 − p_i), is added (log-sum-exp): the exact probability of the rule.

    Args:
        plan_logits: (R, T) planner logits (any value where not masked).
        masked: (R, T) bool, the masked positions M of each row's block.
        chosen: (R, T) bool ⊆ masked, the decisions u.
    Returns:
        (R,) float32, differentiable in ``plan_logits``; 0 for rows with nothing masked.
    """
    z = plan_logits.float()
    on, off = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    zero = torch.zeros_like(z)
    ll = torch.where(masked, torch.where(chosen, on, off), zero).sum(-1)
    empty = torch.where(masked, off, zero).sum(-1)
    best = _argmax_one_hot(z, masked)
    forced = (chosen == best).all(-1) & masked.any(-1)
    return torch.where(forced, torch.logaddexp(ll, empty), ll)


def planner_decisions(
    plan_logits: torch.Tensor,
    masked: torch.Tensor,
    *,
    greedy: bool,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """dUltra's unmasking decisions for one step (spec §8.3).

    Sampling: u_i ~ Bernoulli(p_i) independently for every masked position, p = sigmoid(plan_logits). Greedy
    (evaluation): u_i = [p_i >= threshold]. At-least-one rule (both modes): a row with masked positions but no
    u_i = 1 unmasks its masked position of largest p_i (first on ties), so every step makes progress.

    Args:
        plan_logits: (R, T) planner logits; masked: (R, T) bool.
        greedy, threshold: see above; generator: random source of the Bernoulli draws; uniforms: (R, T) the
            draws' uniforms instead (`keyed_uniform` of `draw_keys`, as the engine passes them).
    Returns:
        (R, T) bool ⊆ masked, at least one position per row that has a masked position.
    """
    p = torch.sigmoid(plan_logits.float())
    if greedy:
        u = p >= threshold
    else:
        r = uniforms if uniforms is not None else torch.rand(p.shape, generator=generator, device=p.device)
        u = r < p
    u = u & masked
    none = ~u.any(-1, keepdim=True)
    return u | (_argmax_one_hot(plan_logits.float(), masked) & none)


def _argmax_one_hot(score: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(R, T) bool: the masked position of largest score per row (first on ties); all False without one."""
    neg = torch.full_like(score, float("-inf"))
    idx = torch.where(masked, score, neg).argmax(-1, keepdim=True)
    return torch.zeros_like(masked).scatter(-1, idx, True) & masked.any(-1, keepdim=True)
