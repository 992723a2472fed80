"""Rollout and training see the same distribution (issue 13).

The engine records the log-probability every token was drawn with; the training module's old-log-prob pass, run
on the rollout weights, must reproduce it token for token (temperature, top-k, top-p, stops mid-block under both
EOS policies, both estimators). And one policy update on a fixed batch must move log-probs in the direction of the
advantages.
"""

from __future__ import annotations

import pytest
import torch

from lrl.algorithms.logprobs import Scoring, response_logprobs, sampling_support, trajectory_rounds
from lrl.algorithms.losses import LossConfig
from lrl.algorithms.token_logprobs import token_logprobs
from lrl.rollout import NativeEngine, SamplingParams
from lrl.rollout.unmasking import sample_tokens

PROMPTS = ["Q: 12+7=?\nA: ", "abc", "x=3; y=x*x"]
# The random tiny model is nearly uniform over its ~100 ids: with 12 stop ids about one token in eight stops a
# response, so most responses stop mid-block.
STOP_IDS = tuple(range(40, 52))


@pytest.fixture(scope="module")
def module(tiny_checkpoint):
    from lrl.module import LightningRLModule

    m = LightningRLModule(str(tiny_checkpoint), loss=LossConfig(kl_beta=0.0), micro_batch_size=4, max_copies=3,
                          rows_per_forward=2)
    m.configure_model()
    return m


def _rollout(module, *, estimator, temperature, top_k, top_p, eos_policy, seed=0):
    lm = module.policy
    if estimator == "single_pass":
        # single pass = every block decoded in ONE forward (threshold 0) with the model's own block size
        bsz, threshold = lm.bd.block_size, 0.0
    else:
        bsz, threshold = 8, 0.3
    sp = SamplingParams(block_size=bsz, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                        max_new_tokens=3 * bsz, stop_token_ids=STOP_IDS, samples_per_prompt=4, seed=seed,
                        eos_policy=eos_policy)
    lm.eval()
    return NativeEngine(lm, module.tokenizer).generate(PROMPTS, sp), bsz


@pytest.mark.parametrize("estimator", ["trajectory", "single_pass"])
@pytest.mark.parametrize("eos_policy", ["truncate", "keep_final_block"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)], ids=["T1", "T0.7-k20-p0.9"])
def test_old_logprobs_equal_engine_sampling_logprobs(module, estimator, eos_policy, temperature, top_k, top_p):
    module.hparams.estimator = estimator
    batch, bsz = _rollout(module, estimator=estimator, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_policy=eos_policy)
    module.hparams.block_size = bsz
    old = torch.cat(module._frozen_logprobs(module.policy, batch))
    engine = torch.tensor([x for lp in batch.sampling_logprobs for x in lp])
    assert old.shape == engine.shape
    torch.testing.assert_close(old, engine, atol=1e-4, rtol=0)
    # the cases the test is about really occurred
    stopped = [r == "stop" for r in batch.finish_reasons]
    assert sum(stopped) >= 3
    if eos_policy == "truncate":
        assert sum(bool(t) for t in batch.tail_ids) >= 2, "no response stopped mid-block"
    else:
        assert not any(batch.tail_ids)
    if estimator == "trajectory":
        assert max(len(set(sm)) for sm in batch.step_maps) >= 4  # multi-step blocks were replayed


def test_tail_is_training_only(module):
    """Texts, lengths and TPF are those of the truncated response; the tail is the rest of the final block."""
    batch, bsz = _rollout(module, estimator="trajectory", temperature=1.0, top_k=0, top_p=1.0, eos_policy="truncate")
    for p, r, t, ts, sm, text in zip(batch.prompt_ids, batch.response_ids, batch.tail_ids, batch.tail_step_maps,
                                     batch.step_maps, batch.texts):
        assert len(t) == len(ts)
        end = len(p) + len(r)
        if t:
            assert r[-1] in STOP_IDS and end % bsz != 0
            assert (end + len(t)) % bsz == 0 or end + len(t) == len(p) + 3 * bsz  # up to the block end or budget
            assert all(s > 0 for s in ts)
        assert text == module.tokenizer.decode(r, skip_special_tokens=True)
    assert torch.equal(batch.num_forwards, torch.tensor([len(set(sm)) for sm in batch.step_maps]))


def test_without_tail_or_temperature_the_logprobs_differ(module):
    """The two defects the issue measured: dropping the tail or the temperature changes the log-probs (so the
    equality test above can fail)."""
    module.hparams.estimator = "trajectory"
    batch, bsz = _rollout(module, estimator="trajectory", temperature=0.7, top_k=0, top_p=1.0, eos_policy="truncate")
    engine = torch.tensor([x for lp in batch.sampling_logprobs for x in lp])
    kw = dict(block_size=bsz, pad_id=module.tokenizer.pad_token_id)
    args = (module.policy, batch.prompt_ids, batch.response_ids, batch.step_maps)
    with torch.no_grad():
        no_temp, _ = response_logprobs(*args, Scoring("trajectory", **kw), tail_ids=batch.tail_ids,
                                       tail_step_maps=batch.tail_step_maps)
        no_tail, _ = response_logprobs(*args, Scoring("trajectory", temperature=0.7, **kw))
    assert (no_temp - engine).abs().max() > 0.05
    assert (no_tail - engine).abs().max() > 1e-3


def test_trajectory_rounds_with_tail_by_hand():
    # prompt 2, block 4: response positions 2..4 (block 0: 2, 3; block 1: 4), tail positions 5..7 of block 1
    # block 1 decoded in steps: pos4 -> 2, pos5 -> 1, pos6 -> 2, pos7 -> 3
    rounds = trajectory_rounds(2, [1, 1, 2], 4, tail_steps=[1, 2, 3])
    # round 0: block 0 step 1 {2, 3}; block 1's only target step is 2: masked = positions with step >= 2
    assert rounds == [([2, 3, 4, 6, 7], [2, 3, 4])]


def _score(logits, tokens, *, temperature=1.0, top_k=0, top_p=1.0, with_entropy=False):
    """Training's head on given logits: hidden = logits, output layer = identity."""
    eye = torch.eye(logits.shape[1])
    return token_logprobs(logits, eye, tokens, temperature=temperature, with_entropy=with_entropy,
                          support=sampling_support(top_k, top_p))


def test_training_head_scores_the_sampling_distribution():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (0.5, 0, 0.8), (1.3, 7, 0.6)]:
        tok, _, lp = sample_tokens(logits, greedy=False, temperature=t, top_k=k, top_p=p,
                                   generator=torch.Generator().manual_seed(1), with_logprobs=True)
        mine, _ = _score(logits, tok, temperature=t, top_k=k, top_p=p)
        torch.testing.assert_close(mine, lp)
    assert sampling_support(0, 1.0) is None
    # by hand: logits [2, 1, 0] at T = 0.5 with top-k 2: log(e^4 / (e^4 + e^2))
    lp, ent = _score(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), temperature=0.5, top_k=2, with_entropy=True)
    assert lp.item() == pytest.approx(-torch.log1p(torch.exp(torch.tensor(-2.0))).item(), abs=1e-6)
    q = torch.tensor([4.0, 2.0]).softmax(0)
    assert ent.item() == pytest.approx(float(-(q * q.log()).sum()), abs=1e-6)
    # a target outside the support keeps a finite log-prob: support {0, 1} plus the target 2
    lp, _ = _score(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([2]), top_k=2)
    assert lp.item() == pytest.approx(float(torch.tensor([2.0, 1.0, 0.0]).log_softmax(0)[2]), abs=1e-6)
    # greedy rollouts record the plain log-softmax
    tok, _, lp = sample_tokens(logits, greedy=True, temperature=0.3, top_k=2, with_logprobs=True)
    torch.testing.assert_close(lp, logits.log_softmax(-1).max(-1).values)


# ---------------------------------------------------------------------------------------------- the update
def _fit_one_step(checkpoint, batch, **model_kw):
    """One RL step of `LightningRLModule` on a fixed batch (the real training_step, optimizer and logging)."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lrl.module import LightningRLModule

    kw = dict(lr=1e-3, warmup_steps=0, max_grad_norm=0.0, micro_batch_size=4, max_rl_steps=1)
    loss = LossConfig(kl_beta=0.0, nll_weight=0.0, tis_cap=model_kw.pop("tis_cap", None))
    module = LightningRLModule(str(checkpoint), block_size=batch.sampling.block_size, loss=loss, **{**kw, **model_kw})
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda x: x))
    return module, {k: float(v) for k, v in trainer.logged_metrics.items()}


def _fixed_batch(module):
    batch, _ = _rollout(module, estimator="trajectory", temperature=0.7, top_k=0, top_p=1.0, eos_policy="truncate")
    n = len(batch)
    batch.advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(n)])
    batch.correct = torch.zeros(n, dtype=torch.bool)
    return batch


def _per_response_logp(lm, batch):
    with torch.no_grad():
        lp, _ = response_logprobs(lm, batch.prompt_ids, batch.response_ids, batch.step_maps,
                                  Scoring("trajectory", block_size=batch.sampling.block_size,
                                          temperature=batch.sampling.temperature),
                                  tail_ids=batch.tail_ids, tail_step_maps=batch.tail_step_maps)
    return torch.stack([x.sum() for x in lp.split([len(r) for r in batch.response_ids])])


def test_update_raises_positive_and_lowers_negative_advantage_logprobs(module, tiny_checkpoint):
    batch = _fixed_batch(module)
    before = _per_response_logp(module.policy, batch)
    trained, metrics = _fit_one_step(tiny_checkpoint, batch, ppo_epochs=1, minibatches=1)
    trained.policy.eval()
    delta = _per_response_logp(trained.policy, batch) - before
    pos, neg = batch.advantages > 0, batch.advantages < 0
    assert delta[pos].mean() > 0 and delta[neg].mean() < 0
    assert (delta[pos] > 0).float().mean() >= 0.75 and (delta[neg] < 0).float().mean() >= 0.75
    # single optimizer step: the mismatch is measured on the detached current log-probs (no extra pass)
    assert metrics["rollout/logprob_abs_diff/max"] < 1e-4
    assert metrics["rollout/logprob_abs_diff/mean"] < 1e-5
    assert metrics["rollout/logprob_corr"] > 0.9999
    assert "rollout/tis_clip_frac" not in metrics


def test_mismatch_metrics_and_tis_against_a_shifted_rollout_engine(module, tiny_checkpoint):
    """A rollout engine whose log-probs are 0.5 nats above training's (as if sampled elsewhere): the old-log-prob
    pass (2 minibatches) reports the gap, and TIS weights every token by min(e^-0.5, C) = e^-0.5."""
    from lrl.algorithms.rollout_mismatch import mismatch_metrics, tis_weights

    batch = _fixed_batch(module)
    batch.sampling_logprobs = [[x + 0.5 for x in lp] for lp in batch.sampling_logprobs]
    _, metrics = _fit_one_step(tiny_checkpoint, batch, minibatches=2, tis_cap=2.0)
    assert metrics["rollout/logprob_abs_diff/mean"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["rollout/logprob_abs_diff/max"] == pytest.approx(0.5, abs=1e-4)
    assert metrics["rollout/logprob_corr"] > 0.9999
    assert metrics["rollout/tis_clip_frac"] == 0.0
    # one optimizer step (old = detached current log-probs, ratio 1): the sequence-mean policy loss is -mean(A)
    # = -(6·1 - 6·0.5)/12 = -0.25 without TIS and e^-0.5 times that with it
    batch.advantages = torch.where(batch.advantages > 0, 1.0, -0.5)
    _, plain = _fit_one_step(tiny_checkpoint, batch)
    _, tis = _fit_one_step(tiny_checkpoint, batch, tis_cap=2.0)
    assert plain["loss/policy"] == pytest.approx(-0.25, abs=1e-5)
    assert tis["loss/policy"] == pytest.approx(plain["loss/policy"] * torch.e ** -0.5, rel=1e-4)
    # by hand: weights min(exp(old - rollout), C)
    w = tis_weights(torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -1.0, -3.0]), 2.0)
    torch.testing.assert_close(w, torch.tensor([torch.e ** 0.5, torch.e ** -1.0, 2.0]))
    m = mismatch_metrics([(torch.tensor([-1.0, -2.0, -0.1]), torch.tensor([-1.5, -1.0, -3.0]))], 2.0)
    assert m["rollout/logprob_abs_diff/mean"] == pytest.approx((0.5 + 1.0 + 2.9) / 3)
    assert m["rollout/logprob_abs_diff/max"] == pytest.approx(2.9)
    assert m["rollout/tis_clip_frac"] == pytest.approx(1 / 3)


def test_tis_needs_sampling_logprobs(module, tiny_checkpoint):
    from lrl.module import LightningRLModule

    with pytest.raises(ValueError, match="model.loss.tis_cap must be > 0"):
        LightningRLModule(str(tiny_checkpoint), loss=LossConfig(tis_cap=0.0))
    for estimator in ("single_pass", "masked_states"):  # they score tokens outside the state that sampled them
        with pytest.raises(ValueError, match="model.loss.tis_cap needs model.estimator=trajectory"):
            LightningRLModule(str(tiny_checkpoint), loss=LossConfig(tis_cap=2.0), estimator=estimator)
    batch = _fixed_batch(module)
    batch.sampling_logprobs = None
    with pytest.raises(ValueError, match="model.loss.tis_cap"):
        _fit_one_step(tiny_checkpoint, batch, tis_cap=2.0)
