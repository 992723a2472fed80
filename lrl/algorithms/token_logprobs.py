"""Selected-token log-probs and entropies from hidden states, without materialising (targets × vocabulary) logits.

The plain path computes ``logits = lm_head(h)`` for every target at once, (M, V) in float32, and autograd keeps
it (and the softmax) for the backward: with SDAR's 151,936-token vocabulary that is 0.6 MB per target, and the
memory of the log-prob pass grows with vocabulary × targets. Here the targets are processed in chunks of
``chunk_size`` rows: the forward keeps only the log-sum-exp per target; the backward recomputes each chunk's
logits and softmax from the saved hidden states and the output weight (one extra (C × H)·(H × V) matmul per
chunk), so peak memory is O(chunk × V) whatever M is. Values and gradients equal the plain path's
(``tests/test_token_logprobs.py``).

Math (per target row, z = (h·Wᵀ + b) / T, y the target token):
    log π(y) = z_y − logsumexp(z),   H = logsumexp(z) − Σ_v p_v z_v,
    ∂ log π(y) / ∂z = onehot(y) − p,   ∂z/∂h = W / T,   ∂z/∂W = h / T.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 256  # rows per chunk: 256 × 151,936 float32 logits ≈ 156 MB live at a time


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    # the matmul in the parameters' dtype, then float32, as the plain path (lm_head(h).float()) does
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # float64 stays float64 (gradcheck)
    return z / temperature if temperature != 1.0 else z


def _restrict(z: torch.Tensor, tokens: torch.Tensor, support) -> torch.Tensor:
    """z outside ``support(z)`` (e.g. the sampler's top-k / top-p set; the target always kept) set to −inf."""
    if support is None:
        return z
    keep = support(z)
    if keep is None:
        return z
    keep[torch.arange(len(tokens), device=z.device), tokens] = True
    return z.masked_fill_(~keep, float("-inf"))


class _ChunkedTokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_size, with_entropy, support):
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, m, chunk_size):
            z = _restrict(_chunk_logits(hidden[s : s + chunk_size], weight, bias, temperature),
                          tokens[s : s + chunk_size], support)
            lse_c = z.logsumexp(-1)
            lse[s : s + chunk_size] = lse_c
            logp[s : s + chunk_size] = z.gather(-1, tokens[s : s + chunk_size, None]).squeeze(-1) - lse_c
            if ent is not None:
                p = (z - lse_c[:, None]).exp_()
                ent[s : s + chunk_size] = lse_c - torch.where(p > 0, p * z, 0.0).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.temperature, ctx.chunk_size, ctx.support = temperature, chunk_size, support
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # accumulate the weight gradient over chunks in float32 (one matmul per chunk in low precision)
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s : s + cs]
            z = _restrict(_chunk_logits(h, weight, bias, t), tokens[s : s + cs], ctx.support)
            g = (z - lse[s : s + cs, None]).exp_()  # softmax, in place
            del z
            g.neg_().scatter_add_(-1, tokens[s : s + cs, None], torch.ones_like(g[:, :1]))  # onehot − p
            g.mul_(grad_logp[s : s + cs, None] / t)
            if need_b:
                grad_b += g.sum(0).to(acc)
            g = g.to(weight.dtype)
            if need_h:
                grad_h[s : s + cs] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).to(acc)
            del g
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    support=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(tokens) under softmax((hidden·Wᵀ + bias) / temperature), chunked over rows (module docstring).

    Args:
        hidden: (M, H) final hidden states at the target positions (grad flows).
        weight: (V, H) output layer weight (grad flows); ``bias``: (V,) or None.
        tokens: (M,) long target ids.
        temperature: softmax temperature (> 0); the rollout's, so old and new log-probs match the sampler's.
        chunk_size: target rows whose logits are live at once (memory knob; results do not depend on it).
        with_entropy: also return the entropy of each distribution (no gradient).
        support: optional ``(C, V) tempered logits → (C, V) bool or None``, the tokens the distribution is
            restricted to (e.g. the sampler's top-k / top-p rule); the target token is always kept. Called on each
            chunk in the forward and again in the backward, so it must be deterministic.
    Returns:
        logp (M,) float32 with gradient, and entropy (M,) float32 or None.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or tokens.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"token_logprobs: shapes hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"tokens {tuple(tokens.shape)} do not fit (M, H), (V, H), (M,)")
    return _ChunkedTokenLogprob.apply(hidden, weight, bias, tokens.long(), float(temperature), int(chunk_size),
                                      bool(with_entropy), support)
