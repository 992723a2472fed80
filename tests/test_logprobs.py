"""Trajectory and single-pass log-probs against slow per-step / per-block recomputation (spec §4.2)."""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.logprobs import Scoring, response_logprobs, trajectory_rounds
from lrl.rollout import NativeEngine, SamplingParams


def test_trajectory_rounds_by_hand():
    # prompt of 3 tokens, block 4: response positions 3..9; block 0 = [3], block 1 = [4..7], block 2 = [8, 9]
    step_map = [1, 3, 2, 3, 2, 4, 5]
    rounds = trajectory_rounds(3, step_map, 4)
    # round 0: block0 step1 {3}; block1 step2: masked {4,5,6,7} (steps 3,2,3,2 >= 2), targets {5,7};
    #          block2 step4: masked {8,9}, targets {8}
    assert rounds[0] == ([3, 4, 5, 6, 7, 8, 9], [3, 5, 7, 8])
    # round 1: block1 step3: masked {4,6}, targets {4,6}; block2 step5: masked {9}, targets {9}
    assert rounds[1] == ([4, 6, 9], [4, 6, 9])
    assert len(rounds) == 2


def test_masked_states_rounds_score_every_still_masked_position():
    step_map = [1, 3, 2, 3, 2, 4, 5]  # as above
    rounds = trajectory_rounds(3, step_map, 4, score_masked=True)
    assert rounds[0] == ([3, 4, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9])  # every position is masked in round 0
    assert rounds[1] == ([4, 6, 9], [4, 6, 9])


def _slow_masked_states(lm, prompt, resp, steps, bs):
    """Each token: mean of its log-prob over the states of its block (one per step id) where it was masked."""
    ids, p = torch.tensor(prompt + resp), len(prompt)
    sums, counts = torch.zeros(len(resp)), torch.zeros(len(resp))
    for t in sorted(set(steps)):
        blk = (p + steps.index(t)) // bs
        seq = ids[: min((blk + 1) * bs, len(ids))].clone()
        masked = [i for i, s in enumerate(steps) if (p + i) // bs == blk and s >= t]
        for i in masked:
            seq[p + i] = lm.bd.mask_token_id
        logp = lm.full_logits(seq[None], torch.tensor([len(seq)]), bs)[0].log_softmax(-1)
        for i in masked:
            sums[i] += logp[p + i, resp[i]]
            counts[i] += 1
    return sums / counts


def test_masked_states_estimator_matches_slow_computation(tiny_lm, tiny_tokenizer):
    bs = 8
    batch = _rollout(tiny_lm, tiny_tokenizer, bs)
    kw = dict(block_size=bs, pad_id=tiny_tokenizer.pad_token_id, max_copies=3, rows_per_forward=2)
    with torch.no_grad():
        fast, ent = response_logprobs(tiny_lm, batch.prompt_ids, batch.response_ids, batch.step_maps,
                                      Scoring("masked_states", **kw), with_entropy=True)
        traj, _ = response_logprobs(tiny_lm, batch.prompt_ids, batch.response_ids, batch.step_maps,
                                    Scoring("trajectory", **kw))
    slow = torch.cat([_slow_masked_states(tiny_lm, p, r, s, bs)
                      for p, r, s in zip(batch.prompt_ids, batch.response_ids, batch.step_maps)])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert ent.shape == fast.shape and bool((ent >= 0).all())
    # tokens unmasked in their block's first step have one state, the trajectory's: same value there
    first = torch.cat([torch.tensor([s == min(x for j, x in enumerate(sm) if (len(p) + j) // bs == (len(p) + i) // bs)
                                     for i, s in enumerate(sm)])
                       for p, sm in zip(batch.prompt_ids, batch.step_maps)])
    torch.testing.assert_close(fast[first], traj[first], atol=1e-5, rtol=1e-5)
    assert bool((~first).any()) and not torch.allclose(fast[~first], traj[~first])


def _rollout(lm, tok, block_size):
    eng = NativeEngine(lm, tok)
    sp = SamplingParams(
        block_size=block_size,
        max_new_tokens=3 * block_size,
        samples_per_prompt=2,
        seed=3,
        threshold=0.3,
        temperature=1.0,
    )
    return eng.generate(["Q: 12+7=?\nA: ", "abc"], sp)


def _slow_trajectory(lm, prompt, resp, steps, bs):
    out = torch.zeros(len(resp))
    ids = torch.tensor(prompt + resp)
    p = len(prompt)
    for t in sorted(set(steps)):
        idx = [i for i, s in enumerate(steps) if s == t]
        blk = (p + idx[0]) // bs
        end = (blk + 1) * bs
        seq = ids[: min(end, len(ids))].clone()
        for i, s in enumerate(steps):
            pos = p + i
            if pos // bs == blk and s >= t:
                seq[pos] = lm.bd.mask_token_id
        logp = lm.full_logits(seq[None], torch.tensor([len(seq)]), bs)[0].log_softmax(-1)
        for i in idx:
            out[i] = logp[p + i, resp[i]]
    return out


@pytest.mark.parametrize("bs", [4, 8])
def test_trajectory_estimator_matches_per_step_slow_computation(tiny_lm, tiny_tokenizer, bs):
    batch = _rollout(tiny_lm, tiny_tokenizer, bs)
    with torch.no_grad():
        fast, _ = response_logprobs(
            tiny_lm,
            batch.prompt_ids,
            batch.response_ids,
            batch.step_maps,
            Scoring("trajectory", block_size=bs, pad_id=tiny_tokenizer.pad_token_id, max_copies=3, rows_per_forward=2),
        )
    slow = torch.cat(
        [
            _slow_trajectory(tiny_lm, p, r, s, bs)
            for p, r, s in zip(batch.prompt_ids, batch.response_ids, batch.step_maps)
        ]
    )
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert len(set(sum(batch.step_maps, []))) > 3  # a real multi-step trajectory was exercised


def test_single_pass_estimator_matches_per_block_slow_computation(tiny_lm, tiny_tokenizer):
    batch = _rollout(tiny_lm, tiny_tokenizer, 8)
    bs = tiny_lm.bd.block_size  # single pass uses the model's configured block size (4), not the rollout's
    with torch.no_grad():
        fast, _ = response_logprobs(
            tiny_lm,
            batch.prompt_ids,
            batch.response_ids,
            batch.step_maps,
            Scoring("single_pass", pad_id=tiny_tokenizer.pad_token_id),
        )
    slow = []
    for p, r in zip(batch.prompt_ids, batch.response_ids):
        ids, n = torch.tensor(p + r), len(p)
        vals = torch.zeros(len(r))
        for blk in range(n // bs, (len(ids) - 1) // bs + 1):
            end = min((blk + 1) * bs, len(ids))
            seq = ids[:end].clone()
            lo = max(blk * bs, n)
            seq[lo:end] = tiny_lm.bd.mask_token_id
            logp = tiny_lm.full_logits(seq[None], torch.tensor([end]), bs)[0].log_softmax(-1)
            for pos in range(lo, end):
                vals[pos - n] = logp[pos, ids[pos]]
        slow.append(vals)
    torch.testing.assert_close(fast, torch.cat(slow), atol=1e-4, rtol=1e-4)


def test_logprobs_have_gradients_and_entropy(tiny_lm, tiny_tokenizer):
    batch = _rollout(tiny_lm, tiny_tokenizer, 4)
    logp, ent = response_logprobs(
        tiny_lm,
        batch.prompt_ids[:1],
        batch.response_ids[:1],
        batch.step_maps[:1],
        Scoring("trajectory", block_size=4, pad_id=tiny_tokenizer.pad_token_id),
        with_entropy=True,
    )
    assert logp.requires_grad and (logp <= 0).all()
    assert ent.shape == logp.shape and (ent >= 0).all() and (ent <= torch.log(torch.tensor(101.0)) + 1e-4).all()
    logp.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_lm.parameters())
    tiny_lm.zero_grad(set_to_none=True)


def test_unknown_estimator_and_missing_block_size(tiny_lm):
    with pytest.raises(ValueError, match="unknown log-prob estimator"):
        response_logprobs(tiny_lm, [[5, 6]], [[7]], [[1]], Scoring("nope", block_size=4))
    with pytest.raises(ValueError, match="block_size"):
        response_logprobs(tiny_lm, [[5, 6]], [[7]], [[1]], Scoring("trajectory"))


def test_sync_forwards_pads_passes_without_changing_values_or_gradients(tiny_lm, tiny_tokenizer):
    """FSDP lockstep: extra dummy forwards (a rank with fewer passes than another) leave log-probs, entropies and
    gradients unchanged, and really run (counted through a forward hook)."""
    batch = _rollout(tiny_lm, tiny_tokenizer, 4)
    kw = dict(scoring=Scoring("trajectory", block_size=4, pad_id=tiny_tokenizer.pad_token_id, max_copies=1,
                              rows_per_forward=2), with_entropy=True)
    args = (batch.prompt_ids, batch.response_ids, batch.step_maps)
    calls = []
    hook = tiny_lm.register_forward_hook(lambda *a: calls.append(1))
    try:
        logp, ent = response_logprobs(tiny_lm, *args, **kw)
        logp.sum().backward()
        grads = [p.grad.clone() for p in tiny_lm.parameters()]
        tiny_lm.zero_grad(set_to_none=True)
        local = len(calls)
        seen = []
        logp2, ent2 = response_logprobs(tiny_lm, *args, **kw, sync_forwards=lambda n: seen.append(n) or n + 3)
        logp2.sum().backward()
    finally:
        hook.remove()
    assert seen == [local] and len(calls) == 2 * local + 3
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)
    torch.testing.assert_close(ent2, ent, rtol=0, atol=0)
    for p, g in zip(tiny_lm.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    tiny_lm.zero_grad(set_to_none=True)


def test_masked_states_nll_step_raises_first_state_confidence_of_late_tokens(tiny_lm, tiny_tokenizer):
    """The point of masked_states: training on it makes tokens likelier in the block's first state (all masked),
    where the parallelism of a block is decided. A sign-flipped loss lowers it."""
    import copy

    bs = tiny_lm.bd.block_size  # single_pass scores the first state of each block at the model's block size
    batch = _rollout(tiny_lm, tiny_tokenizer, bs)
    pad = tiny_tokenizer.pad_token_id
    args = (batch.prompt_ids, batch.response_ids, batch.step_maps)

    def first_state(lm):
        with torch.no_grad():
            return response_logprobs(lm, *args, Scoring("single_pass", pad_id=pad))[0].sum()

    for sign in (1.0, -1.0):
        lm = copy.deepcopy(tiny_lm)
        before = first_state(lm)
        logp, _ = response_logprobs(lm, *args, Scoring("masked_states", block_size=bs, pad_id=pad))
        (-sign * logp.sum()).backward()
        with torch.no_grad():
            for prm in lm.parameters():
                if prm.grad is not None:
                    prm -= 1e-3 * prm.grad
        assert (first_state(lm) - before) * sign > 0
