"""dUltra planner (spec §8.3): the head's checkpoint file, the decision rule and its log-probability, the engine's
``planner`` strategy. Tiny random model, short budgets: seconds."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from lrl.models import build_tiny_model, load_checkpoint, save_checkpoint
from lrl.models.planner import PLANNER_FILE, PlannerConfig, PlannerHead
from lrl.rollout import NativeEngine, SamplingParams
from lrl.rollout.unmasking import planner_decisions, planner_logprob

PROMPTS = ["Q: 12+7=?\nA: ", "hi", "abcdefgh"]


def constant_head(lm, logit: float, use_confidence: bool = True) -> PlannerHead:
    """A head whose logit is ``logit`` everywhere (output weights zero)."""
    head = PlannerHead(PlannerConfig(hidden_size=lm.hf_config.hidden_size, inner_size=8,
                                     use_confidence=use_confidence, init_bias=logit))
    with torch.no_grad():
        head.fc2.weight.zero_()
    return head


def random_head(lm, seed: int = 1, bias: float = 0.0) -> PlannerHead:
    torch.manual_seed(seed)
    head = PlannerHead(PlannerConfig(hidden_size=lm.hf_config.hidden_size, inner_size=16, init_bias=bias))
    with torch.no_grad():
        head.fc2.weight.normal_(0, 1.0)  # p varies across positions
    return head


# ------------------------------------------------------------------ checkpoint
def test_planner_head_save_load_round_trip(tmp_path, tiny_tokenizer):
    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.planner = random_head(lm)
    save_checkpoint(lm, tmp_path / "ck", tokenizer=tiny_tokenizer)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["planner_head"] == {"hidden_size": 128, "inner_size": 16, "use_confidence": True, "init_bias": 0.0}
    assert (tmp_path / "ck" / PLANNER_FILE).is_file()
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.planner is not None
    for (n1, a), (n2, b) in zip(lm.planner.state_dict().items(), loaded.planner.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    states, conf = torch.randn(5, 128), torch.rand(5)
    assert torch.equal(lm.planner(states, conf), loaded.planner(states, conf))
    assert not hasattr(loaded.hf_config, "planner_head")  # not leaked into the backbone's config
    # a loader that does not know the head (plain transformers) still loads the backbone
    from transformers import Qwen3ForCausalLM

    plain = Qwen3ForCausalLM.from_pretrained(str(tmp_path / "ck"), local_files_only=True)
    assert torch.equal(plain.lm_head.weight, lm.model.lm_head.weight)
    # saving the loaded model carries the head; dropping it removes file entry and config key
    save_checkpoint(loaded, tmp_path / "again", tokenizer=tiny_tokenizer)
    again, _ = load_checkpoint(tmp_path / "again")
    assert torch.equal(again.planner(states, conf), lm.planner(states, conf))
    again.planner = None
    save_checkpoint(again, tmp_path / "again", tokenizer=tiny_tokenizer)
    assert "planner_head" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert load_checkpoint(tmp_path / "again")[0].planner is None


def test_checkpoint_without_head_loads(tiny_checkpoint):
    lm, _ = load_checkpoint(tiny_checkpoint)
    assert lm.planner is None
    assert "planner_head" not in json.loads((tiny_checkpoint / "config.json").read_text())


def test_head_entry_without_file_is_a_clear_error(tmp_path, tiny_tokenizer):
    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.planner = random_head(lm)
    save_checkpoint(lm, tmp_path / "ck", tokenizer=tiny_tokenizer)
    (tmp_path / "ck" / PLANNER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="planner_head"):
        load_checkpoint(tmp_path / "ck")


# ------------------------------------------------------------------ decision rule
def test_planner_logprob_hand_numbers_and_normalisation():
    p = torch.tensor([0.2, 0.6, 0.9])
    z = torch.logit(p)[None]
    masked = torch.tensor([[True, True, False]])  # position 2 is not masked: ignored
    # plain Bernoulli outcome: u = (1, 1) -> 0.2 * 0.6
    both = planner_logprob(z, masked, torch.tensor([[True, True, False]]))
    assert both.item() == pytest.approx(math.log(0.2 * 0.6), abs=1e-6)
    # u = e_0 (not the argmax): 0.2 * 0.4
    assert planner_logprob(z, masked, torch.tensor([[True, False, False]])).item() == pytest.approx(
        math.log(0.2 * 0.4), abs=1e-6)
    # u = e_1 (the argmax) is also what an empty draw becomes: 0.8 * 0.6 + 0.8 * 0.4
    assert planner_logprob(z, masked, torch.tensor([[False, True, False]])).item() == pytest.approx(
        math.log(0.8), abs=1e-6)
    # the rule is a distribution over non-empty decisions: its probabilities sum to one (4 masked positions)
    z4 = torch.tensor([[0.3, -1.2, 2.0, -0.1]])
    m4 = torch.ones(1, 4, dtype=torch.bool)
    total = sum(planner_logprob(z4, m4, torch.tensor([u], dtype=torch.bool)).exp().item()
                for u in itertools.product([False, True], repeat=4) if any(u))
    assert total == pytest.approx(1.0, abs=1e-6)
    assert planner_logprob(z4, torch.zeros_like(m4), torch.zeros_like(m4)).item() == 0.0


def test_planner_decisions_rules():
    masked = torch.tensor([[False, True, True, True], [True, True, False, False], [False] * 4])
    one_hot = torch.tensor([[-50.0, -50.0, 50.0, -50.0], [-50.0, 50.0, 0.0, 0.0], [0.0] * 4])
    gen = torch.Generator().manual_seed(0)
    expect = torch.tensor([[False, False, True, False], [False, True, False, False], [False] * 4])
    assert torch.equal(planner_decisions(one_hot, masked, greedy=False, generator=gen), expect)
    assert torch.equal(planner_decisions(one_hot, masked, greedy=True), expect)
    # greedy threshold and the at-least-one rule (none >= 0.5 -> the masked argmax, unmasked ones never chosen)
    z = torch.logit(torch.tensor([[0.99, 0.3, 0.45, 0.2], [0.6, 0.7, 0.9, 0.9], [0.9] * 4]))
    got = planner_decisions(z, masked, greedy=True, threshold=0.5)
    assert got.tolist() == [[False, False, True, False], [True, True, False, False], [False] * 4]
    # sampling frequencies follow p (independent Bernoulli; at-least-one rarely triggers with these p)
    z = torch.logit(torch.tensor([[0.9, 0.5, 0.7]])).expand(20000, 3)
    freq = planner_decisions(z, torch.ones(20000, 3, dtype=torch.bool), greedy=False,
                             generator=torch.Generator().manual_seed(1)).float().mean(0)
    assert torch.allclose(freq, torch.tensor([0.9, 0.5, 0.7]), atol=0.015)


# ------------------------------------------------------------------ engine strategy
def _planner_lm(tiny_tokenizer, head_fn, block_size: int = 4):
    lm = build_tiny_model(tiny_tokenizer, block_size=block_size, seed=0)
    lm.eval()
    lm.planner = head_fn(lm)
    return lm


@pytest.mark.parametrize("greedy", [True, False])
def test_p_one_decodes_each_block_in_one_step(tiny_tokenizer, greedy):
    lm = _planner_lm(tiny_tokenizer, lambda lm: constant_head(lm, 40.0))
    eng = NativeEngine(lm, tiny_tokenizer)
    sp = SamplingParams(block_size=4, remasking_strategy="planner", greedy=greedy, max_new_tokens=10,
                        samples_per_prompt=2, seed=3)
    out = eng.generate(PROMPTS, sp)
    for i, (p, sm) in enumerate(zip(out.prompt_ids, out.step_maps)):
        plen = len(p)
        blocks = [(plen + j) // 4 for j in range(len(sm))]
        # one step per block: positions share a step id iff they share a block, ids 1, 2, ... in block order
        first = blocks[0]
        assert sm == [b - first + 1 for b in blocks], (i, sm)
        assert int(out.num_forwards[i]) == len(set(blocks))
        steps = max(sm + out.tail_step_maps[i])
        assert len(out.planner_logprobs[i]) == steps
        assert all(abs(v) < 1e-6 for v in out.planner_logprobs[i])  # log 1 per decision


@pytest.mark.parametrize("greedy", [True, False])
def test_argmax_rule_reproduces_sequential_decoding(tiny_tokenizer, greedy):
    """p ≡ 0 everywhere: nothing is drawn, the at-least-one rule unmasks the first masked position (argmax ties go
    to the first), i.e. exactly sequential decoding with one token per step; tokens are drawn from the same
    stream, so ids and step maps match the ``sequential`` strategy."""
    lm = _planner_lm(tiny_tokenizer, lambda lm: constant_head(lm, -40.0))
    eng = NativeEngine(lm, tiny_tokenizer)
    common = dict(block_size=4, greedy=greedy, temperature=1.0, max_new_tokens=9, samples_per_prompt=2, seed=5)
    plan = eng.generate(PROMPTS, SamplingParams(remasking_strategy="planner", **common))
    seq = eng.generate(PROMPTS, SamplingParams(remasking_strategy="sequential", denoising_steps=4, **common))
    assert plan.response_ids == seq.response_ids
    assert plan.step_maps == seq.step_maps
    assert plan.sampling_logprobs == seq.sampling_logprobs
    for sm in plan.step_maps:
        assert sm == list(range(1, len(sm) + 1))
    assert seq.planner_logprobs is None


def test_planner_strategy_needs_a_head(tiny_lm, tiny_tokenizer):
    with pytest.raises(ValueError, match="planner head"):
        NativeEngine(tiny_lm, tiny_tokenizer).generate(["hi"], SamplingParams(remasking_strategy="planner"))
    with pytest.raises(ValueError, match="planner_threshold"):
        SamplingParams(remasking_strategy="planner", planner_threshold=1.5)


# ------------------------------------------------------------------ step log-probs (training side)
def slow_step_logprobs(lm, prompt, resp, sm, tail, tail_sm, bs, temperature):
    """One uncached K = 1 forward per step: x_s has the step's block masked where step >= s, earlier blocks clean."""
    ids = torch.tensor([list(prompt) + list(resp) + list(tail)])
    steps = [0] * len(prompt) + list(sm) + list(tail_sm)
    end = len(prompt) + len(resp)
    dec, tok = [], []
    for s in range(1, max(steps) + 1):
        blk = steps.index(s) // bs
        pos = range(blk * bs, min((blk + 1) * bs, len(steps)))
        masked = [i for i in pos if steps[i] >= s]
        noisy = torch.zeros(1, 1, ids.shape[1], dtype=torch.bool)
        noisy[0, 0, masked] = True
        states = lm.diffusion_states(ids, noisy, torch.tensor([ids.shape[1]]), bs)  # order: masked positions
        logits = lm.logits(states).float()
        z = lm.planner(states, logits.softmax(-1).amax(-1))
        m = torch.ones(1, len(masked), dtype=torch.bool)
        u = torch.tensor([[steps[i] == s for i in masked]])
        dec.append(planner_logprob(z[None], m, u).item())
        lp = (logits / temperature).log_softmax(-1)
        tok.append(sum(lp[r, ids[0, i]].item() for r, i in enumerate(masked) if steps[i] == s and i < end))
    return dec, tok


@pytest.mark.parametrize("logit_shift", [False, True])
def test_step_logprobs_match_slow_recomputation_and_rollout(tiny_tokenizer, logit_shift):
    from lrl.algorithms.planner_logprobs import planner_step_logprobs

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0, logit_shift=logit_shift)
    lm.eval()
    lm.planner = random_head(lm, seed=2, bias=-0.5)
    stops = tiny_tokenizer.convert_tokens_to_ids(list("aeiou "))  # frequent stops: mid-block tails appear
    sp = SamplingParams(block_size=4, remasking_strategy="planner", temperature=0.7, max_new_tokens=12,
                        samples_per_prompt=3, seed=11, stop_token_ids=stops)
    out = NativeEngine(lm, tiny_tokenizer).generate(PROMPTS, sp)
    assert any(out.tail_ids) and any(len(set(sm)) < len(sm) for sm in out.step_maps)  # tails and parallel steps
    dec, tok, n_steps = planner_step_logprobs(
        lm, out.prompt_ids, out.response_ids, out.step_maps, block_size=4, max_copies=2, rows_per_forward=4,
        tail_ids=out.tail_ids, tail_step_maps=out.tail_step_maps, temperature=0.7, pad_id=tiny_tokenizer.pad_token_id)
    assert n_steps == [len(x) for x in out.planner_logprobs]
    at = 0
    with torch.no_grad():
        for j in range(len(out)):
            want_dec, want_tok = slow_step_logprobs(lm, out.prompt_ids[j], out.response_ids[j], out.step_maps[j],
                                                    out.tail_ids[j], out.tail_step_maps[j], 4, 0.7)
            got_dec, got_tok = dec[at : at + n_steps[j]], tok[at : at + n_steps[j]]
            assert torch.allclose(got_dec, torch.tensor(want_dec), atol=1e-4), j
            assert torch.allclose(got_tok, torch.tensor(want_tok), atol=1e-4), j
            # the rollout recorded the same decision log-probs, and token log-probs summing to the same per step
            assert torch.allclose(got_dec, torch.tensor(out.planner_logprobs[j]), atol=1e-4), j
            per_step = torch.zeros(n_steps[j]).index_add(0, torch.tensor(out.step_maps[j]) - 1,
                                                         torch.tensor(out.sampling_logprobs[j]))
            assert torch.allclose(got_tok, per_step, atol=1e-4), j
            at += n_steps[j]
    assert bool((dec < -1e-3).any())  # the decisions are genuinely stochastic here


def test_step_logprobs_gradient_reaches_head_and_backbone(tiny_tokenizer):
    from lrl.algorithms.planner_logprobs import planner_step_logprobs

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.planner = random_head(lm, seed=3)
    out = NativeEngine(lm, tiny_tokenizer).generate(
        ["hi"], SamplingParams(block_size=4, remasking_strategy="planner", max_new_tokens=8, seed=1))
    dec, tok, _ = planner_step_logprobs(lm, out.prompt_ids, out.response_ids, out.step_maps, block_size=4,
                                        tail_ids=out.tail_ids, tail_step_maps=out.tail_step_maps)
    (dec.sum() + tok.sum()).backward()
    assert lm.planner.fc2.weight.grad.abs().sum() > 0
    assert lm.model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ imitation
def test_imitation_reproduces_threshold_decoding_on_held_out_prompts(tiny_tokenizer):
    """BCE + argmax imitation of greedy threshold decoding (φ = 0.5) on 8 prompts; measured on 4 other prompts:
    teacher-forced step agreement (the planner's greedy decisions on the teacher's states) and free-running
    trajectory agreement (same token at the same step) both rise from chance to >= 0.9."""
    from lrl.algorithms.planner_imitation import decision_agreement, fit_imitation, imitation_examples, step_agreement

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.eval()
    with torch.no_grad():  # a sharper random model: confidences spread over (0, 1), so φ = 0.5 gives a mix
        lm.model.lm_head.weight.mul_(10.0)
    lm.planner = PlannerHead(PlannerConfig(hidden_size=128, inner_size=32))
    eng = NativeEngine(lm, tiny_tokenizer)
    train = ["Q: 12+7=?\nA: ", "hi", "abcdefgh", "The quick brown fox", "x=3; y=x*x", "hello world", "2+2=",
             "def f(x):"]
    held = ["Q: 3*4=?\nA: ", "jumps over", "print(y)", "lorem ipsum"]
    common = dict(block_size=4, greedy=True, max_new_tokens=16)
    teacher = SamplingParams(remasking_strategy="low_confidence_dynamic", threshold=0.5, **common)
    planner = SamplingParams(remasking_strategy="planner", **common)
    ref = eng.generate(held, teacher)
    assert 1.1 < ref.batch_tpf < 3.0  # a mix of parallel and single steps
    pad = tiny_tokenizer.pad_token_id
    before = step_agreement(lm, ref, block_size=4, pad_id=pad), decision_agreement(eng.generate(held, planner), ref)
    losses = fit_imitation(lm.planner, *imitation_examples(lm, eng.generate(train, teacher), block_size=4,
                                                           pad_id=pad), block_size=4)
    assert losses[-1] < 0.5 * losses[0]
    after = step_agreement(lm, ref, block_size=4, pad_id=pad), decision_agreement(eng.generate(held, planner), ref)
    assert max(before) < 0.6, before
    assert min(after) >= 0.9, after


def test_planner_weights_sync_and_sweep(tiny_tokenizer):
    from lrl.evaluation import run_pareto_sweep
    from lrl.tasks import get_task

    lm = _planner_lm(tiny_tokenizer, lambda lm: constant_head(lm, -40.0))
    eng = NativeEngine(lm, tiny_tokenizer)
    new = constant_head(lm, 40.0)
    eng.update_weights({f"planner.{k}": v for k, v in new.state_dict().items()}, version=7)
    assert eng.weight_version == 7 and lm.planner.fc2.bias.item() == 40.0
    task = get_task("synthetic", num_train=10, num_eval=4)
    res = run_pareto_sweep(eng, task, task.load("test"), thresholds=[0.9], block_size=4, max_new_tokens=8,
                           stop_token_ids=(tiny_tokenizer.eos_token_id,), planner_thresholds=[0.5, 1.0])
    assert [p.setting for p in res.points] == ["static_1tok", "dynamic@0.9", "planner@0.5", "planner@1"]
    one_step, at_one = res.points[2], res.points[3]
    # p ≡ 1: every block in one forward at t = 0.5; at t = 1 too (sigmoid(40) rounds to 1 in float32)
    assert one_step.forwards == at_one.forwards < res.points[0].forwards


def test_planner_policy_loss_hand_numbers_and_direction():
    from lrl.algorithms.planner_objective import planner_policy_loss

    # response 0: 2 steps, A = +1; response 1: 1 step, A = −2; ε = 0.2
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.75, 0.5, 0.25]))  # ratios 1.5 (clipped to 1.2 for A > 0), 1.0, 0.5
    adv = torch.tensor([1.0, -2.0])
    loss = planner_policy_loss(new, old, adv, [2, 1], num_responses=4)
    # response 0: mean(−min(1.5, 1.2), −1.0) = −1.1; response 1: −min(0.5·−2, 0.8·−2) = 1.6; sum / 4
    assert loss.item() == pytest.approx((-1.1 + 1.6) / 4, abs=1e-6)
    # direction: a gradient step raises the decision log-prob of a positive-advantage step, lowers a negative one
    x = torch.zeros(2, requires_grad=True)
    planner_policy_loss(x, x.detach(), torch.tensor([1.0, -1.0]), [1, 1]).backward()
    assert x.grad[0] < 0 < x.grad[1]
    with pytest.raises(ValueError, match="line up"):
        planner_policy_loss(new, old, adv, [1, 1])


def test_joint_step_loss_hand_numbers():
    """One ratio per step on decisions + tokens (spec §8.3, planner_ratio=joint), clip/KL/NLL by hand."""
    from math import log

    from lrl.algorithms.losses import LossConfig, build_normalizer
    from lrl.algorithms.planner_objective import joint_step_loss

    # response 0: 2 steps, A = +1, correct; response 1: 1 step, A = −2; ε = 0.2
    dec = torch.log(torch.tensor([0.6, 1.0, 0.5]))
    tok = torch.log(torch.tensor([0.5, 0.5, 0.5]))  # step probs 0.3, 0.5, 0.25
    old = torch.log(torch.tensor([0.2, 0.5, 0.5]))  # ratios 1.5 (clipped to 1.2 for A > 0), 1.0, 0.5
    ref = torch.log(torch.tensor([0.3, 0.5, 0.5]))  # k3 KL of the last step: 2 − 1 + log 0.5 = 1 − log 2
    adv, seq = torch.tensor([1.0, 1.0, -2.0]), torch.tensor([0, 0, 1])
    norm = build_normalizer(torch.tensor([2, 1]), torch.tensor([True, False]))
    correct = torch.tensor([True, True, False])
    kw = dict(ref_step_logp=ref, correct_steps=correct)
    out = joint_step_loss(dec, tok, old, adv, seq, norm, LossConfig(kl_beta=0.1, nll_weight=0.5), **kw)
    # sequence mean of −surr: response 0 mean(−1.2, −1.0) = −1.1, response 1 −min(0.5·−2, 0.8·−2) = 1.6
    policy = (-1.1 + 1.6) / 2
    kl = 0.1 * (1 - log(2)) / 3  # token (= step) mean over the 3 steps
    nll = 0.5 * log(2)  # the tokens' part only: −log 0.5 per correct step, mean over the 2 correct steps
    assert out.loss.item() == pytest.approx(policy + kl + nll, abs=1e-6)
    assert out.stats.policy.item() == pytest.approx(policy, abs=1e-6)
    assert out.stats.nll.item() == pytest.approx(nll, abs=1e-6)
    tok_red = joint_step_loss(dec, tok, old, adv, seq, norm,
                              LossConfig(kl_beta=0.1, nll_weight=0.5, policy_reduction="token"), **kw)
    assert tok_red.stats.policy.item() == pytest.approx(-(1.2 + 1.0 - 1.6) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="correct_steps"):
        joint_step_loss(dec, tok, old, adv, seq, norm, LossConfig(nll_weight=0.5, kl_beta=0.0))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_joint_step_loss_direction(sign):
    """A gradient step on the joint loss raises the probability of a step's recorded decisions (and of its
    tokens) when the advantage is positive, and lowers it when negative."""
    from lrl.algorithms.losses import LossConfig, build_normalizer
    from lrl.algorithms.planner_objective import joint_step_loss

    z = torch.tensor([[0.3, -0.2, 0.1, 0.0]], requires_grad=True)  # planner logits of one block
    w = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)  # token logits at the unmasked positions
    masked = torch.tensor([[True, True, True, False]])
    chosen = torch.tensor([[True, False, True, False]])

    def step_parts():
        return planner_logprob(z, masked, chosen), w.log_softmax(-1)[:1].sum().reshape(1)

    dec0, tok0 = (x.detach() for x in step_parts())
    norm = build_normalizer(torch.tensor([1]), torch.tensor([False]))
    opt = torch.optim.SGD([z, w], lr=0.1)
    dec, tok = step_parts()
    joint_step_loss(dec, tok, (dec + tok).detach(), torch.tensor([sign]), torch.tensor([0]), norm,
                    LossConfig(kl_beta=0.0, nll_weight=0.0)).loss.backward()
    opt.step()
    dec1, tok1 = (x.detach() for x in step_parts())
    assert sign * float(dec1 - dec0) > 1e-4 and sign * float(tok1 - tok0) > 1e-4


# ------------------------------------------------------------------ lrl fit
@pytest.mark.parametrize(("freeze", "ratio"), [(False, "separate"), (True, "separate"), (False, "joint")],
                         ids=["joint", "planner_only", "joint_ratio"])
def test_two_step_fit_with_dultra_config(peaky_checkpoint, tiny_tokenizer, tmp_path, monkeypatch, freeze, ratio):
    """2 RL steps of `lrl fit --config configs/dultra.yaml` on the tiny model: planner rollouts, the planner's
    PPO term logged, the head moved and synced to the rollout engine; the backbone moved too, unless frozen
    (planner-only: `--config configs/algorithm/planner_only.yaml` on top).
    The planner-only run also adds the distillation reward of a (random) AR teacher."""
    from pathlib import Path

    from lrl.cli import cli_main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    args = ["fit", "--config", str(root / "configs" / "dultra.yaml"), "--checkpoint", str(peaky_checkpoint),
            "--block_size", "4", "--data.init_args.prompts_per_step=2", "--data.init_args.group_size=4",
            "--data.init_args.max_new_tokens=8", "--data.init_args.task_kwargs={num_train: 40, num_eval: 8}",
            "--data.init_args.eval_size=4", "--data.init_args.max_refill_rounds=1",
            "--model.init_args.micro_batch_size=3", "--model.init_args.lr=1e-3", "--model.init_args.warmup_steps=0",
            "--model.init_args.eval.max_new_tokens=8", "--model.init_args.eval.thresholds=[0.5]",
            "--model.init_args.max_rl_steps=2", f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
            "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",
            "--trainer.callbacks=["
            f"{{class_path: callbacks.RLCheckpoint, init_args: {{dirpath: {out}/ckpts, save_last: true, "
            "every_n_rl_steps: 1, keep_last: -1}}]", f"--model.init_args.planner_ratio={ratio}"]
    if freeze:  # the shipped planner-only overlay (configs/algorithm/planner_only.yaml) freezes the backbone
        args += ["--config", str(root / "configs" / "algorithm" / "planner_only.yaml")]
        build_teacher(tmp_path / "teacher", tiny_tokenizer)
        # one more reward term: appended to the config's list (acc, tpf, steps)
        args.append(f"--data.init_args.rewards+={{class_path: lrl.rewards.terms.Distill, "
                    f"init_args: {{teacher: {tmp_path / 'teacher'}}}}}")
    cli = cli_main(args)
    module = cli.model
    assert module.rl_step == 2
    batch = module.last_batch
    assert batch.planner_logprobs is not None and batch.sampling.remasking_strategy == "planner"
    # separate: the decisions' own PPO term is logged; joint: one ratio per step, inside the policy term
    assert ("loss/planner" in cli.trainer.logged_metrics) == (ratio == "separate")
    assert "steps" in batch.rewards  # dUltra's step-count reward is on in configs/dultra.yaml
    r = batch.rewards
    parts = r["acc"] + r["tpf"] + r["steps"] + (r["distill"] if freeze else 0.0)
    assert torch.allclose(r["total"], parts)
    assert ("distill" in r) == freeze and (not freeze or bool((r["distill_raw"] < 0).all()))
    head = module.policy.planner
    assert float(head.fc2.weight.detach().abs().sum()) > 0  # zero at creation: the planner term moved it
    engine_head = cli.datamodule.get_generator().lm.planner
    assert torch.equal(engine_head.fc2.weight, head.fc2.weight)  # synced to the rollout engine
    val = next(iter(cli.datamodule.val_dataloader()))
    res = module.run_pareto(val["task"], val["records"], stop_token_ids=val["stop_token_ids"])
    assert [p.setting for p in res.points][-3:] == ["planner@0.7", "planner@0.5", "planner@0.3"]
    base, _ = load_checkpoint(peaky_checkpoint)
    assert torch.equal(base.model.lm_head.weight, module.policy.model.lm_head.weight) == freeze
    if ratio == "joint":  # scripts/export_policy.py: the run's last .ckpt → an HF directory with the head
        import sys

        sys.path.insert(0, str(root / "scripts"))
        from export_policy import export_policy

        exported, _ = load_checkpoint(export_policy(out / "ckpts" / "last.ckpt", tmp_path / "policy"))
        assert torch.equal(exported.model.lm_head.weight, module.policy.model.lm_head.weight)
        assert not torch.equal(exported.model.lm_head.weight, base.model.lm_head.weight)
        assert torch.equal(exported.planner.fc2.weight, head.fc2.weight)


def test_step_count_reward_hand_numbers():
    from lrl.algorithms.dultra_rewards import step_count_reward

    forwards = torch.tensor([4, 9, 16, 16])
    groups = torch.tensor([0, 0, 1, 1])
    assert step_count_reward(forwards, groups, scale=2.0).tolist() == [-2.0, -4.5, -8.0, -8.0]
    assert step_count_reward(forwards, groups, kind="sqrt", scale=2.0).tolist() == [-1.0, -1.5, -2.0, -2.0]
    # z-scored per group: fewer forwards → +1, more → −1; a flat group → 0
    assert step_count_reward(forwards, groups, mode="z_score").tolist() == [1.0, -1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="scale"):
        step_count_reward(forwards, groups, scale=0.0)


# ------------------------------------------------------------------ distillation reward
def build_teacher(path, tokenizer):
    """A random 1-layer Qwen2 causal LM saved with ``tokenizer``: a stand-in AR teacher."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id)
    teacher = Qwen2ForCausalLM(cfg).eval()
    teacher.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return teacher


def test_teacher_scorer_matches_one_token_at_a_time(tmp_path, tiny_tokenizer):
    """Batched, padded teacher scoring equals a slow reference: one unpadded forward per completion token."""
    from lrl.rewards.distill import TeacherScorer

    teacher = build_teacher(tmp_path / "teacher", tiny_tokenizer)
    prompts, completions = ["Q: 1+1=", "hello", "x"], ["2", "world, and more", ""]
    scorer = TeacherScorer(str(tmp_path / "teacher"), batch_size=2)
    got = scorer.score(prompts, completions)
    for j, (p, c) in enumerate(zip(prompts, completions)):
        pi = scorer.tokenizer(p, add_special_tokens=False).input_ids  # the teacher's own tokenizer
        ci = scorer.tokenizer(c, add_special_tokens=False).input_ids
        lps = []
        with torch.no_grad():
            for k, t in enumerate(ci):
                logits = teacher(input_ids=torch.tensor([pi + ci[:k]])).logits[0, -1]
                lps.append(logits.log_softmax(-1)[t].item())
        want = sum(lps) / len(lps) if lps else 0.0
        assert got[j].item() == pytest.approx(want, abs=1e-5), j
