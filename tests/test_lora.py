"""LoRA on the policy (issue 28 item 6): settings, the reference as the base, the rollout weights, the update
direction. End-to-end `lrl fit` / `lrl validate` / resume / export: tests/test_lora_fit.py."""

from __future__ import annotations

import pytest
import torch
from test_rollout_train_match import _fit_one_step, _fixed_batch, _per_response_logp

from lrl.algorithms.losses import LossConfig
from lrl.models import load_checkpoint
from lrl.models.lora import MergedWeights, adapters_disabled, lora_model, lora_settings
from lrl.models.sharding import cast_copy
from lrl.rollout import NativeEngine, SamplingParams

LORA = {"rank": 4, "alpha": 8.0}
PROMPTS = ["Q: 12+7=?\nA: ", "abc", "x=3; y=x*x"]


def _module(checkpoint, **kw):
    from lrl.module import LightningRLModule

    args = dict(loss=LossConfig(kl_beta=kw.pop("kl_beta", 0.0)), micro_batch_size=4, max_copies=3, rows_per_forward=2,
                block_size=4)
    m = LightningRLModule(str(checkpoint), **{**args, **kw})
    m.configure_model()
    return m


def _perturb(m, seed=0):
    """Nonzero adapters (B starts at zero, so a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _generate(lm, tokenizer, seed=0):
    sp = SamplingParams(block_size=4, threshold=0.3, temperature=1.0, max_new_tokens=12, samples_per_prompt=2,
                        seed=seed, stop_token_ids=())
    lm.eval()
    return NativeEngine(lm, tokenizer).generate(PROMPTS, sp)


@pytest.mark.parametrize("value, key", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
    ({"target_modules": []}, "target_modules"), ({"target_modules": "q_proj"}, "target_modules"),
    ({"r": 8}, "r"),
])
def test_bad_settings_name_the_key_in_one_line(value, key):
    with pytest.raises(ValueError) as info:
        lora_settings(value)
    msg = str(info.value)
    assert msg.startswith(f"model.init_args.lora.{key} ") and "\n" not in msg, msg


def test_unknown_target_and_contradictions_are_refused(tiny_checkpoint):
    from lrl.module import LightningRLModule

    with pytest.raises(ValueError, match=r"^model.init_args.lora.target_modules: 'qkv' matches no linear layer"):
        _module(tiny_checkpoint, lora={"target_modules": ["q_proj", "qkv"]})
    with pytest.raises(ValueError, match="model.init_args.lora with model.init_args.freeze_backbone"):
        LightningRLModule(str(tiny_checkpoint), lora=LORA, freeze_backbone=True)


def test_only_adapters_train_and_the_reference_is_the_base(tiny_checkpoint):
    """kl_beta > 0: no second model; the reference's log-probs are the base checkpoint's, the policy's are not."""
    m = _module(tiny_checkpoint, kl_beta=0.01, lora=LORA)
    _perturb(m)
    assert m._ref == [] and m.reference is m.policy
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers × 7 projections, rank 4: r·(in + out) each (hidden 128 = q, kv 64, intermediate 384):
    # q, o 128 + 128; k, v 128 + 64; gate, up 128 + 384; down 384 + 128
    expected = 2 * 4 * (2 * (128 + 128) + 2 * (128 + 64) + 2 * (128 + 384) + (384 + 128))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected
    base = _module(tiny_checkpoint)  # the plain checkpoint, no adapters
    batch = _generate(base.policy, base.tokenizer)
    ref = torch.cat(m._reference_logprobs(batch, False))
    plain = torch.cat(base._frozen_logprobs(base.policy, batch))
    torch.testing.assert_close(ref, plain, atol=1e-6, rtol=0)
    adapted = torch.cat(m._frozen_logprobs(m.policy, batch))  # the context restored the adapters
    assert (adapted - plain).abs().max() > 0.05


def test_native_rollout_decodes_with_the_adapters(tiny_checkpoint):
    """The engine over the LoRA policy samples what a plain model with W + BA samples, not what the base does."""
    m = _module(tiny_checkpoint, lora=LORA)
    _perturb(m)
    merged = cast_copy(m.policy, torch.float32, source=MergedWeights(m.policy.model, buffers=True))
    assert lora_model(merged) is None and not any("lora" in n for n, _ in merged.named_parameters())
    got = _generate(m.policy, m.tokenizer)
    want = _generate(merged, m.tokenizer)
    with adapters_disabled(m.policy):
        base = _generate(m.policy, m.tokenizer)
    assert got.response_ids == want.response_ids
    for a, b in zip(got.sampling_logprobs, want.sampling_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert got.response_ids != base.response_ids
    # and the training side scores those tokens as the engine sampled them (rollout = adapter model)
    scored = torch.cat(m._frozen_logprobs(m.policy, got))
    torch.testing.assert_close(scored, torch.tensor([x for lp in got.sampling_logprobs for x in lp]), atol=1e-4,
                               rtol=0)
    # the merged weight is W + (alpha / rank)·B·A, by hand
    layer = m.policy.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged.model.model.layers[0].self_attn.q_proj.weight, w, atol=1e-6, rtol=0)


def test_engine_weight_source(tiny_checkpoint):
    """`_build_generator`: the policy itself without a rollout dtype; a bf16 copy of the merged weights with one,
    built without touching the live policy."""
    from types import SimpleNamespace

    from datamodules.rollout import RolloutBackend, RolloutDataModule

    m = _module(tiny_checkpoint, lora=LORA)
    _perturb(m)
    before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    for dtype, shared in ((None, True), ("bfloat16", False)):
        dm = RolloutDataModule(str(tiny_checkpoint), block_size=4, rollout=RolloutBackend(dtype=dtype))
        dm.trainer = SimpleNamespace(lightning_module=m)
        engine = dm._build_generator()
        assert (engine.lm is m.policy) == shared
        if not shared:
            merged = MergedWeights(m.policy.model)
            for name, t in engine.lm.model.named_parameters():
                assert t.dtype == torch.bfloat16 and torch.equal(t, merged[name].to(torch.bfloat16)), name
    after = m.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_update_direction_with_lora(tiny_checkpoint):
    """One LightningRL step with LoRA: positive-advantage responses' log-probs rise, negative ones fall; the base
    weights do not move."""
    base = _module(tiny_checkpoint)
    batch = _fixed_batch(base)
    before = _per_response_logp(base.policy, batch)  # fresh adapters (B = 0): the base's log-probs
    trained, _ = _fit_one_step(tiny_checkpoint, batch, lora=LORA, lr=1e-2)
    trained.policy.eval()
    delta = _per_response_logp(trained.policy, batch) - before
    pos, neg = batch.advantages > 0, batch.advantages < 0
    assert delta[pos].mean() > 0 and delta[neg].mean() < 0
    assert (delta[pos] > 0).float().mean() >= 0.75 and (delta[neg] < 0).float().mean() >= 0.75
    plain, _ = load_checkpoint(tiny_checkpoint)
    merged = MergedWeights(trained.policy.model)
    moved = [k for k, v in plain.model.state_dict().items() if not torch.equal(merged[k], v)]
    assert moved  # the adapters changed what the policy computes...
    with adapters_disabled(trained.policy):  # ...while the frozen base stayed bit for bit the checkpoint's
        base_now = {k.replace(".base_layer.", "."): v for k, v in trained.policy.model.state_dict().items()
                    if ".lora_" not in k}
    assert all(torch.equal(base_now[k], v) for k, v in plain.model.state_dict().items())
