"""Chunked selected-token log-probs (`lrl.algorithms.token_logprobs`): values, entropies and gradients equal the
plain (M × V logits) path's; float64 gradcheck as an independent reference."""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.token_logprobs import token_logprobs


def _plain(hidden, weight, tokens, bias=None, temperature=1.0):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float() / temperature
    lse = z.logsumexp(-1)
    logp = z.gather(-1, tokens[:, None]).squeeze(-1) - lse
    p = (z - lse[:, None]).exp()
    return logp, (lse - (p * z).sum(-1)).detach()


def _inputs(m=7, h=5, v=11, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(m, h, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g).to(dtype).requires_grad_() if bias else None
    tokens = torch.randint(0, v, (m,), generator=g)
    return hidden, weight, b, tokens


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_the_plain_path(chunk_size, temperature, bias):
    hidden, weight, b, tokens = _inputs(bias=bias)
    coeff = torch.linspace(-1.0, 2.0, tokens.numel())  # a non-uniform upstream gradient
    ref, ref_ent = _plain(hidden, weight, tokens, b, temperature)
    params = [hidden, weight] + ([b] if bias else [])
    ref_grads = torch.autograd.grad((ref * coeff).sum(), params)
    got, ent = token_logprobs(hidden, weight, tokens, bias=b, temperature=temperature, chunk_size=chunk_size,
                              with_entropy=True)
    grads = torch.autograd.grad((got * coeff).sum(), params)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # entropy ~1 nat summed over 11 logits in float32: chunking reorders the sums (seen: 3.8e-6 on this box)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_hand_worked_value():
    # one row, logits z = [0, ln 3] → p = [1/4, 3/4]; log π(1) = ln(3/4), H = −(¼ ln ¼ + ¾ ln ¾)
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]])
    logp, ent = token_logprobs(hidden, weight, torch.tensor([1]), with_entropy=True)
    assert logp.item() == pytest.approx(float(torch.log(torch.tensor(0.75))), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.25 * float(torch.log(torch.tensor(0.25))) + 0.75 *
                                         float(torch.log(torch.tensor(0.75)))), abs=1e-6)


def test_gradcheck_float64():
    hidden, weight, b, tokens = _inputs(m=4, h=3, v=6, dtype=torch.float64, bias=True)
    fn = lambda h, w, bb: token_logprobs(h, w, tokens, bias=bb, temperature=0.7, chunk_size=3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, b))


def test_bfloat16_matches_the_plain_bfloat16_path():
    hidden, weight, _, tokens = _inputs(m=9, h=16, v=50, dtype=torch.bfloat16)
    ref, _ = _plain(hidden, weight, tokens)
    rg = torch.autograd.grad(ref.sum(), [hidden, weight])
    got, _ = token_logprobs(hidden, weight, tokens, chunk_size=4)
    gg = torch.autograd.grad(got.sum(), [hidden, weight])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # same bf16 matmul, same float32 softmax
    for a, r in zip(gg, rg):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-2)


def test_bad_arguments():
    hidden, weight, _, tokens = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="shapes"):
        token_logprobs(hidden, weight.t(), tokens)


@pytest.mark.parametrize("estimator", ["trajectory", "single_pass"])
def test_response_logprobs_gradients_equal_the_plain_logits_path(tiny_checkpoint, estimator):
    """`response_logprobs` (chunked head inside the model's forward) against log-softmax over full logits."""
    from lrl.algorithms.logprobs import Scoring, pack_samples, response_logprobs
    from lrl.models import load_checkpoint

    lm, _ = load_checkpoint(tiny_checkpoint)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    responses = [[20, 21, 22, 23, 24], [30, 31, 32]]
    steps = [[1, 1, 2, 3, 3], [1, 2, 2]]
    got, ent = response_logprobs(lm, prompts, responses, steps, Scoring(estimator, block_size=4), with_entropy=True)
    coeff = torch.linspace(-1.0, 1.0, got.numel())
    g_new = torch.autograd.grad((got * coeff).sum(), list(lm.parameters()))

    packed = pack_samples(prompts, responses, steps, estimator=estimator,
                          block_size=4 if estimator == "trajectory" else lm.bd.block_size, pad_id=0)
    bs = 4 if estimator == "trajectory" else lm.bd.block_size
    logits = lm.diffusion_logits(packed.input_ids, packed.noisy, packed.lengths, bs)
    b, k, pos = packed.noisy.nonzero(as_tuple=True)
    is_t = packed.targets[b, k, pos]
    z = logits[is_t].float()
    tok = packed.input_ids[b[is_t], pos[is_t]]
    ref = z.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
    order = torch.argsort(packed.sample[b[is_t]] * (1 << 32) + pos[is_t])
    ref = ref[order]
    g_ref = torch.autograd.grad((ref * coeff).sum(), list(lm.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)[order]
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-4, atol=1e-5)
    for a, r in zip(g_new, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_restricted_support_equals_the_plain_masked_path():
    """A top-k support (the sampler's rule is passed in the same way): the target is always kept, the rest of the
    vocabulary outside the support gets probability 0, values/entropy/gradients equal masking full logits."""
    hidden, weight, _, tokens = _inputs(m=6, h=5, v=11)

    def top3(z):
        return z >= z.topk(3, dim=-1).values[:, -1:]

    z = (hidden @ weight.t()) / 0.8
    keep = top3(z.detach())
    keep[torch.arange(6), tokens] = True
    assert not bool(top3(z.detach())[torch.arange(6), tokens].all())  # some targets lie outside the top 3
    zm = z.masked_fill(~keep, float("-inf"))
    ref = zm.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    p = zm.softmax(-1)
    ref_ent = -torch.where(p > 0, p * zm.log_softmax(-1), torch.zeros_like(p)).sum(-1)
    rg = torch.autograd.grad(ref.sum(), [hidden, weight])
    got, ent = token_logprobs(hidden, weight, tokens, temperature=0.8, chunk_size=4, with_entropy=True,
                              support=top3)
    gg = torch.autograd.grad(got.sum(), [hidden, weight])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(ent, ref_ent.detach())
    for a, r in zip(gg, rg):
        torch.testing.assert_close(a, r)
