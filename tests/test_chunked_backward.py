"""`backward_logprobs` (forward + backward per packed chunk) gives the gradients of the one-backward path (issue 28).

The reference is the old path: every log-prob of the micro-batch computed with the graph alive, the LightningRL
loss of all tokens, one backward. The chunked path must match it within 1e-6 for every estimator, whatever
``rows_per_forward`` is, and pass each token's log-prob to the loss exactly once (trajectory, single pass).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lrl.algorithms.logprobs import Scoring, backward_logprobs, response_logprobs
from lrl.algorithms.losses import LossConfig, build_normalizer, lightningrl_loss
from lrl.rollout import NativeEngine, SamplingParams


@pytest.fixture(scope="module")
def batch(tiny_lm, tiny_tokenizer):
    sp = SamplingParams(block_size=8, max_new_tokens=24, samples_per_prompt=3, seed=5, threshold=0.3,
                        temperature=1.0)
    return NativeEngine(tiny_lm, tiny_tokenizer).generate(["Q: 12+7=?\nA: ", "abc", "x"], sp)


def _loss_inputs(batch):
    n = len(batch)
    lengths = torch.tensor([len(r) for r in batch.response_ids])
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(n, generator=g)
    correct = torch.tensor([i % 2 == 0 for i in range(n)])
    old = torch.randn(int(lengths.sum()), generator=g) * 0.1 - 2.0
    ref = old + torch.randn(old.shape, generator=g) * 0.05
    return {
        "adv": torch.repeat_interleave(adv, lengths),
        "seq": torch.repeat_interleave(torch.arange(n), lengths),
        "correct": torch.repeat_interleave(correct, lengths),
        "old": old,
        "ref": ref,
        "norm": build_normalizer(lengths, correct),
    }


def _loss(logp, x, index=None):
    def pick(t):
        return t if index is None else t[index]

    return lightningrl_loss(logp, pick(x["old"]), pick(x["adv"]), pick(x["seq"]), x["norm"],
                            LossConfig(kl_beta=0.05, nll_weight=0.1), ref_logp=pick(x["ref"]),
                            correct_tokens=pick(x["correct"]))


def _grads(lm):
    return {k: p.grad.detach().clone() for k, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("estimator", ["trajectory", "single_pass", "masked_states"])
@pytest.mark.parametrize("rows_per_forward", [1, 3])
def test_chunked_backward_equals_one_backward(tiny_lm, tiny_tokenizer, batch, estimator, rows_per_forward):
    lm = copy.deepcopy(tiny_lm).train()
    x = _loss_inputs(batch)
    kw = dict(scoring=Scoring(estimator, block_size=8, pad_id=tiny_tokenizer.pad_token_id, max_copies=2,
                              rows_per_forward=rows_per_forward))
    args = (batch.prompt_ids, batch.response_ids, batch.step_maps)

    lm.zero_grad(set_to_none=True)
    logp, _ = response_logprobs(lm, *args, **kw)
    whole = _loss(logp, x)
    whole.loss.backward()
    want = _grads(lm)

    lm.zero_grad(set_to_none=True)
    seen, parts, calls = [], [], []

    def loss_fn(lp, index, ent):
        seen.append(index)
        out = _loss(lp, x, index)
        parts.append(float(out.loss.detach()))
        return out.loss, out.nonfinite

    stats = {}
    backward_logprobs(lm, *args, loss_fn=loss_fn, backward=lambda loss: (calls.append(1), loss.backward()),
                      stats=stats, **kw)
    got = _grads(lm)
    assert want.keys() == got.keys() and len(want) > 5
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    # the parts of the loss add up to the loss of all tokens, each token scored once
    assert sum(parts) == pytest.approx(float(whole.loss), abs=1e-6)
    index = torch.cat(seen)
    assert sorted(index.tolist()) == list(range(logp.numel()))
    n_rows_min = len(batch)  # at least one packed row per response
    if estimator != "masked_states":
        assert len(calls) >= -(-n_rows_min // rows_per_forward) and len(seen) == len(calls)
    assert stats["forward_tokens"] > 0


def test_chunked_backward_pads_to_the_synced_count(tiny_lm, tiny_tokenizer, batch):
    """Extra passes requested by ``sync_backwards`` backpropagate exactly zero."""
    lm = copy.deepcopy(tiny_lm).train()
    x = _loss_inputs(batch)
    kw = dict(scoring=Scoring("trajectory", block_size=8, pad_id=tiny_tokenizer.pad_token_id, max_copies=2,
                              rows_per_forward=2))
    args = (batch.prompt_ids, batch.response_ids, batch.step_maps)
    calls = []

    def run(sync):
        lm.zero_grad(set_to_none=True)
        calls.clear()
        backward_logprobs(lm, *args, loss_fn=lambda lp, i, e: (_loss(lp, x, i).loss, False),
                          backward=lambda loss: (calls.append(1), loss.backward()), sync_backwards=sync, **kw)
        return _grads(lm), len(calls)

    base, n = run(None)
    padded, m = run(lambda local: local + 3)
    assert m == n + 3
    for k in base:
        torch.testing.assert_close(padded[k], base[k], atol=0, rtol=0)


def test_chunked_forward_drops_padding_to_the_micro_batch_longest_row(tiny_lm, tiny_tokenizer, batch):
    """Rows are cut to their chunk's longest row, so rows_per_forward=1 runs fewer positions than one forward
    over all rows padded to the longest (the count is the decoder's sequence length × rows)."""
    kw = dict(block_size=8, pad_id=tiny_tokenizer.pad_token_id, max_copies=2)
    args = (batch.prompt_ids, batch.response_ids, batch.step_maps)
    one, many = {}, {}
    with torch.no_grad():
        a, _ = response_logprobs(tiny_lm, *args, Scoring("trajectory", rows_per_forward=1, **kw), stats=one)
        b, _ = response_logprobs(tiny_lm, *args, Scoring("trajectory", rows_per_forward=64, **kw), stats=many)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert one["forward_tokens"] < many["forward_tokens"]
