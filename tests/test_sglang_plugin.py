"""The SGLang plugin without SGLang: its step equals the native engine's, and its glue works on a fake SGLang.

* `plugin_block_step` driven block by block over the tiny model (SGLang's layout: a KV-commit forward ends each
  block) gives the same tokens and step maps as `NativeEngine`, greedy and seeded-sampled.
* Greedy requests reproduce stock ``LowConfidence`` (strict ``>`` threshold) except at exact ties.
* `register()` against a fake ``sglang`` module tree inserts ``LRLLowConfidence`` and the scheduler hook; a fake
  FDFO scheduler loop with the real algorithm class and hook returns step maps equal to the native engine's.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lrl.rollout import NativeEngine, SamplingParams
from lrl.rollout import sglang_plugin as sp_mod
from lrl.rollout.sglang_plugin import (
    STEP_MAP_KEY,
    BlockStepState,
    PluginAlgoConfig,
    RowSampling,
    apply_block_record,
    plugin_block_step,
)

PROMPTS = ["hello world", "abc", "The quick brown fox", "x"]


def _engine_attention(lm):
    """The attention path the native engine uses for its forwards (so both sides compute identical logits)."""
    from lrl.rollout import engine

    fast = getattr(engine, "_fast_attention", None)
    return fast(lm) if fast is not None else contextlib.nullcontext()


def _row_sampling(sp: SamplingParams) -> RowSampling:
    return RowSampling(greedy=sp.greedy, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p)


def _algo_cfg(sp: SamplingParams) -> PluginAlgoConfig:
    return PluginAlgoConfig(block_size=sp.block_size, strategy=sp.remasking_strategy, threshold=sp.threshold,
                            denoising_steps=sp.denoising_steps)


@torch.no_grad()
def drive_plugin(lm, prompt: list[int], sp: SamplingParams, generator, pad_id: int,
                 logprobs: list | None = None) -> tuple[list[int], list[int]]:
    """Decode one prompt with `plugin_block_step` the way SGLang drives a block (commit forward included); the
    streamed sampling log-probs are appended to ``logprobs`` when given."""
    with _engine_attention(lm):
        return _drive(lm, prompt, sp, generator, pad_id, logprobs)


def _drive(lm, prompt, sp, generator, pad_id, logprobs=None):
    bsz, mask = sp.block_size, lm.bd.mask_token_id
    plen, budget = len(prompt), len(prompt) + sp.max_new_tokens
    full = plen // bsz * bsz
    cache = lm.new_cache(1, (budget + bsz - 1) // bsz * bsz)
    if full:
        lm.forward_chunk(cache, torch.tensor([prompt[:full]]), block_size=bsz, store=torch.tensor([full]))
    cfg, samp = _algo_cfg(sp), [_row_sampling(sp)]
    req = SimpleNamespace(customized_info=None, output_ids=[])
    start = full
    while True:
        pos = list(range(start, start + bsz))
        gen = [plen <= p < budget for p in pos]
        tokens = torch.tensor([[prompt[p] if p < plen else (mask if g else pad_id) for p, g in zip(pos, gen)]])
        prompt_mask = torch.tensor([[not g for g in gen]])
        valid = torch.tensor([[p < budget for p in pos]])
        states = [BlockStepState.new(bsz)]
        while True:
            commit = not bool(((tokens == mask) & ~prompt_mask).any())
            logits = lm.forward_chunk(cache, tokens, block_size=bsz, key_valid=valid,
                                      store=torch.tensor([bsz if commit else 0]))
            tokens, done, records = plugin_block_step(logits, tokens, mask, states, samp, cfg, generator, prompt_mask)
            if done[0]:
                break
        apply_block_record(req, records[0])
        new = [int(t) for t, g in zip(tokens[0].tolist(), gen) if g]
        req.output_ids.extend(new)
        stops = [i for i, t in enumerate(req.output_ids) if t in set(sp.stop_token_ids)]
        if stops:
            end = stops[0] + 1
            break
        if len(req.output_ids) >= sp.max_new_tokens:
            end = sp.max_new_tokens
            break
        start += bsz
    if logprobs is not None:
        logprobs.extend(req.customized_info[sp_mod.LOGPROB_KEY][:end])
    return req.output_ids[:end], req.customized_info[STEP_MAP_KEY][:end]


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_static", "sequential"])
def test_plugin_step_equals_native_greedy(tiny_lm, tiny_tokenizer, strategy):
    sp = SamplingParams(block_size=4, remasking_strategy=strategy, threshold=0.3, denoising_steps=2, greedy=True,
                        max_new_tokens=15, stop_token_ids=(tiny_tokenizer.eos_token_id,))
    engine = NativeEngine(tiny_lm, tiny_tokenizer)
    for prompt in PROMPTS[:3]:
        ids = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
        ref = engine.generate([ids], sp)
        got_ids, got_steps = drive_plugin(tiny_lm, ids, sp, None, engine.pad_id)
        assert got_ids == ref.response_ids[0], prompt
        assert got_steps == ref.step_maps[0], prompt


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (20, 0.9, 0.7)])
def test_plugin_step_equals_reference_sampled(tiny_lm, tiny_tokenizer, top_k, top_p, temperature):
    """Sampled: the plugin draws from its per-rank generator in position order, so it equals the slow reference
    driven by the same stream (tokens, step maps, sampling log-probs). The native engine keys its draws per row
    instead (`lrl.rollout.unmasking.draw_keys`): the same distribution, other samples (docs/sglang.md)."""
    from decode_reference import reference_decode

    sp = SamplingParams(block_size=4, threshold=0.2, temperature=temperature, top_k=top_k, top_p=top_p,
                        max_new_tokens=21, seed=123)
    pad = NativeEngine(tiny_lm, tiny_tokenizer).pad_id
    for prompt in PROMPTS[:2]:
        ids = tiny_tokenizer(prompt, add_special_tokens=False).input_ids
        want_lps: list[float] = []
        want_ids, want_steps, _ = reference_decode(tiny_lm, ids, sp, pad, generator=torch.Generator().manual_seed(
            sp.seed), logprobs=want_lps)
        lps = []
        got_ids, got_steps = drive_plugin(tiny_lm, ids, sp, torch.Generator().manual_seed(sp.seed), pad, lps)
        assert got_ids == want_ids
        assert got_steps == want_steps
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps))  # meta_info's


def _stock_low_confidence(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int, threshold: float) -> torch.Tensor:
    """SGLang 0.5.23 LowConfidence's rule, restated for comparison (argmax, strict > threshold, else top-1)."""
    masked = tokens == mask_id
    x = logits.argmax(-1)
    conf = torch.where(masked, logits.softmax(-1).gather(-1, x[..., None]).squeeze(-1), -torch.inf)
    transfer = conf > threshold
    top1 = torch.zeros_like(transfer).scatter(1, conf.argmax(1, keepdim=True), True)
    transfer = torch.where(transfer.any(1, keepdim=True), transfer, top1)
    return torch.where(transfer & masked, x, tokens)


def test_greedy_matches_stock_low_confidence():
    g = torch.Generator().manual_seed(0)
    mask_id, b, t, v = 7, 5, 8, 30
    cfg = PluginAlgoConfig(threshold=0.35)
    for _ in range(20):
        logits = torch.randn(b, t, v, generator=g) * 3
        tokens = torch.randint(0, v, (b, t), generator=g)
        tokens[torch.rand(b, t, generator=g) < 0.6] = mask_id
        tokens[0] = mask_id
        states = [BlockStepState.new(t) for _ in range(b)]
        ours, _, _ = plugin_block_step(logits, tokens, mask_id, states, [RowSampling()] * b, cfg)
        assert torch.equal(ours, _stock_low_confidence(logits, tokens, mask_id, cfg.threshold))


def test_threshold_tie_is_the_documented_difference():
    # two equally likely tokens → confidence exactly 0.5 at every position: ours (>=) unmasks all, stock only one
    logits = torch.full((1, 4, 6), -torch.inf)
    logits[..., 1] = logits[..., 2] = 0.0
    tokens = torch.full((1, 4), 5)
    ours, _, _ = plugin_block_step(logits, tokens, 5, [BlockStepState.new(4)], [RowSampling()],
                                   PluginAlgoConfig(threshold=0.5))
    stock = _stock_low_confidence(logits, tokens, 5, 0.5)
    assert (ours != 5).sum() == 4 and (stock != 5).sum() == 1


def test_step_records_and_done_semantics():
    logits = torch.zeros(2, 4, 6)
    logits[..., 3] = 10.0  # every position confident → all unmasked in one step
    tokens = torch.tensor([[9, 5, 5, 5], [9, 9, 9, 9]])  # row 1 has no mask: done at once (prompt-only block)
    prompt_mask = torch.tensor([[True, False, False, False], [True] * 4])
    states = [BlockStepState.new(4), BlockStepState.new(4)]
    cfg = PluginAlgoConfig(threshold=0.9)
    new, done, recs = plugin_block_step(logits, tokens, 5, states, [RowSampling()] * 2, cfg, None, prompt_mask)
    assert new[0].tolist() == [9, 3, 3, 3] and done == [False, True]
    assert recs[0] is None and recs[1].step_map == (0, 0, 0, 0)
    new, done, recs = plugin_block_step(logits, new, 5, states, [RowSampling()] * 2, cfg, None, prompt_mask)
    assert done == [True, True] and recs[0].step_map == (0, 1, 1, 1) and recs[0].steps == 1
    assert recs[0].forwards == 2 and recs[1] is None  # exported once
    # greedy: the plain log-softmax of the chosen token, 10 − log(e^10 + 5)
    lp = 10.0 - math.log(math.exp(10.0) + 5.0)
    assert recs[0].logprobs[1:] == pytest.approx((lp, lp, lp), abs=1e-6)
    req = SimpleNamespace(customized_info=None)
    assert apply_block_record(req, recs[0]) == 3
    assert apply_block_record(req, sp_mod.BlockRecord(step_map=(2, 1, 0, 0), steps=2, forwards=3)) == 2
    assert req.customized_info[STEP_MAP_KEY] == [1, 1, 1, 3, 2]
    assert req.customized_info[sp_mod.LOGPROB_KEY] == pytest.approx([lp] * 3, abs=1e-6)  # prompt slot left out
    assert req.customized_info[sp_mod.NFE_KEY] == [1, 1, 1, 3, 3]
    assert req.customized_info[sp_mod.STORE_KEY] == [1, 1, 1, 2, 2]


def test_config_and_sampling_mapping():
    assert PluginAlgoConfig.from_dict({"block_size": 4, "remasking_strategy": "sequential"}).strategy == "sequential"
    with pytest.raises(ValueError, match="unknown keys"):
        PluginAlgoConfig.from_dict({"treshold": 0.9})
    with pytest.raises(ValueError, match="strategy"):
        PluginAlgoConfig.from_dict({"strategy": "random"})
    with pytest.raises(ValueError, match="threshold"):
        PluginAlgoConfig(threshold=1.5)
    assert RowSampling.from_sglang(1.0, 1, 1.0).greedy  # SGLang turns temperature 0 into top_k 1
    s = RowSampling.from_sglang(0.7, 1 << 30, 0.9)
    assert not s.greedy and s.top_k == 1 << 30 and s.temperature == pytest.approx(0.7)
    info = SimpleNamespace(is_all_greedy=False, temperatures=torch.tensor([[1.0], [0.5]]),
                           top_ks=torch.tensor([1, 5]), top_ps=torch.tensor([1.0, 0.8]))
    rows = sp_mod.sampling_from_info(info, 2)
    assert rows[0].greedy and not rows[1].greedy and rows[1].top_k == 5


def test_register_without_sglang_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match="needs SGLang"):
        sp_mod.register()


# ---------------------------------------------------------------------------------------------- fake SGLang
class _FakeLowConfidence:
    """Just enough of SGLang 0.5.23's LowConfidence/DllmAlgorithm for the plugin: config fields and FDFO ``run``."""

    def __init__(self, config):
        self.block_size = config.block_size
        self.mask_id = config.mask_id
        self.fdfo = True
        self.threshold = config.algorithm_config.get("threshold", 0.95)

    def init_step_state(self, forward_batch):
        return [None] * forward_batch.batch_size

    def run(self, model_runner, forward_batch, algo_states=None):
        fresh = self.init_step_state(forward_batch)
        states = [s if s is not None else fresh[i] for i, s in enumerate(algo_states)]
        out = model_runner.forward(forward_batch)
        done = self.step(forward_batch, out.logits_output.full_logits, states)
        ids = forward_batch.input_ids.view(forward_batch.batch_size, self.block_size).tolist()
        return (out.logits_output, ids, [self.block_size if d else 0 for d in done],
                [None if d else s for d, s in zip(done, states)], False)


@pytest.fixture
def fake_sglang(monkeypatch):
    hooks = []
    mods = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.dllm", "sglang.srt.dllm.algorithm",
        "sglang.srt.dllm.algorithm.low_confidence", "sglang.srt.plugins", "sglang.srt.plugins.hook_registry")}
    mods["sglang.srt.dllm.algorithm"].algo_name_to_cls = {}
    mods["sglang.srt.dllm.algorithm.low_confidence"].LowConfidence = _FakeLowConfidence
    mods["sglang.srt.dllm"].algorithm = mods["sglang.srt.dllm.algorithm"]
    registry = SimpleNamespace(register=lambda target, fn, kind: hooks.append((target, fn, kind)))
    mods["sglang.srt.plugins.hook_registry"].HookRegistry = registry
    mods["sglang.srt.plugins.hook_registry"].HookType = SimpleNamespace(AROUND="around")
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(sp_mod, "_ALGO_CLS", None)
    monkeypatch.setattr(sp_mod, "_REGISTERED", False)
    return mods["sglang.srt.dllm.algorithm"].algo_name_to_cls, hooks


def _fake_scheduler_commit(scheduler, batch, result):
    """The FDFO branch of SchedulerDllmMixin.process_batch_result_dllm, reduced to what the hook depends on."""
    for idx, req in enumerate(batch.reqs):
        if result.accept_length_per_req_cpu[idx] == 0:
            req.dllm_algo_state = result.dllm_algo_state[idx]
            req.block = result.next_token_ids[idx]
            continue
        req.dllm_algo_state = None
        new = [t for t, g in zip(result.next_token_ids[idx], req.gen) if g]
        req.output_ids.extend(new)
        req.committed = True


@torch.no_grad()
def test_fake_sglang_fdfo_loop_matches_native(fake_sglang, tiny_lm, tiny_tokenizer):
    algos, hooks = fake_sglang
    sp_mod.register()
    sp_mod.register()  # idempotent: the hook must wrap once
    assert list(algos) == [sp_mod.ALGORITHM_NAME] and len(hooks) == 1 and hooks[0][0] == sp_mod.HOOK_TARGET
    hook = hooks[0][1]
    sp = SamplingParams(block_size=4, threshold=0.5, greedy=True, max_new_tokens=18,
                        stop_token_ids=(tiny_tokenizer.eos_token_id,))
    lm, bsz, mask = tiny_lm, sp.block_size, tiny_lm.bd.mask_token_id
    algo = algos[sp_mod.ALGORITHM_NAME](SimpleNamespace(
        block_size=bsz, mask_id=mask, algorithm_config={"block_size": bsz, "threshold": sp.threshold}))
    engine = NativeEngine(lm, tiny_tokenizer)
    prompts = [tiny_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    ref = engine.generate(prompts, sp)

    n = len(prompts)
    budget = [len(p) + sp.max_new_tokens for p in prompts]
    cache = lm.new_cache(n, max((b + bsz - 1) // bsz * bsz for b in budget))
    reqs = []
    for i, p in enumerate(prompts):  # prefill each prompt's full blocks
        full = len(p) // bsz * bsz
        if full:
            with _engine_attention(lm):
                lm.forward_chunk(cache, torch.tensor([p[:full]]), rows=torch.tensor([i]), block_size=bsz,
                                 store=torch.tensor([full]))
        reqs.append(SimpleNamespace(prompt=p, start=full, output_ids=[], customized_info=None, dllm_algo_state=None,
                                    finished=False, committed=True, block=None, gen=None))

    def open_block(r, i):
        pos = range(r.start, r.start + bsz)
        r.gen = [len(r.prompt) <= q < budget[i] for q in pos]
        r.block = [r.prompt[q] if q < len(r.prompt) else (mask if g else engine.pad_id) for q, g in zip(pos, r.gen)]
        r.committed = False

    for i, r in enumerate(reqs):
        open_block(r, i)
    with _engine_attention(lm):
        _fdfo_loop(lm, algo, hook, reqs, budget, cache, sp, open_block)
    for k, r in enumerate(reqs):
        assert r.output_ids[: r.end] == ref.response_ids[k]
        assert r.customized_info[STEP_MAP_KEY][: r.end] == ref.step_maps[k]  # what the output streamer sends
        assert len(r.customized_info[STEP_MAP_KEY]) == len(r.output_ids)


def _fdfo_loop(lm, algo, hook, reqs, budget, cache, sp, open_block):
    """Rounds of one forward + algorithm step + scheduler commit over the live requests (FDFO)."""
    bsz, mask = sp.block_size, lm.bd.mask_token_id
    while not all(r.finished for r in reqs):
        live = [i for i, r in enumerate(reqs) if not r.finished]
        batch = SimpleNamespace(reqs=[reqs[i] for i in live])
        tokens = torch.tensor([reqs[i].block for i in live])
        prompt_mask = torch.tensor([[not g for g in reqs[i].gen] for i in live])
        commit = ~((tokens == mask) & ~prompt_mask).any(1)
        valid = torch.tensor([[reqs[i].start + j < budget[i] for j in range(bsz)] for i in live])
        logits = lm.forward_chunk(cache, tokens, rows=torch.tensor(live), block_size=bsz, key_valid=valid,
                                  store=torch.where(commit, bsz, 0))
        fb = SimpleNamespace(batch_size=len(live), input_ids=tokens.reshape(-1).clone(), dllm_prompt_mask=prompt_mask,
                             sampling_info=SimpleNamespace(is_all_greedy=True))
        runner = SimpleNamespace(forward=lambda _fb, lg=logits: SimpleNamespace(
            logits_output=SimpleNamespace(full_logits=lg.reshape(-1, lg.shape[-1]), customized_info=None)))
        lo, next_ids, accept, states, _ = algo.run(runner, fb, [r.dllm_algo_state for r in batch.reqs])
        result = SimpleNamespace(logits_output=lo, next_token_ids=next_ids, accept_length_per_req_cpu=accept,
                                 dllm_algo_state=states)
        hook(_fake_scheduler_commit, None, batch, result)
        assert lo.customized_info is None  # the hook consumed the records
        for i in live:
            r = reqs[i]
            if not r.committed:
                continue
            stops = [k for k, t in enumerate(r.output_ids) if t in sp.stop_token_ids]
            if stops or len(r.output_ids) >= sp.max_new_tokens:
                r.finished = True
                r.end = stops[0] + 1 if stops else sp.max_new_tokens
            else:
                r.start += bsz
                open_block(r, i)


def test_launch_script_dry_run(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "scripts" / "launch_sglang.sh"
    out = subprocess.run(["bash", str(script), "--model", "/ckpt/sdar", "--port", "30123", "--threshold", "0.85",
                          "--strategy", "low_confidence_static", "--config-dir", str(tmp_path), "--dry-run", "--",
                          "--attention-backend", "flashinfer"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    cfg_file = tmp_path / "lrl_dllm_30123.yaml"
    cfg = PluginAlgoConfig.from_dict(yaml.safe_load(cfg_file.read_text()))  # the plugin accepts what it writes
    assert cfg.threshold == 0.85 and cfg.strategy == "low_confidence_static" and cfg.block_size == 32
    for piece in ("SGLANG_PLUGINS=lrl_dllm", "--dllm-algorithm LRLLowConfidence", f"--dllm-algorithm-config {cfg_file}",
                  "--max-running-requests 128", "--enable-memory-saver", "--trust-remote-code", "--port 30123",
                  "--attention-backend flashinfer"):
        assert piece in out.stdout
    bad = subprocess.run(["bash", str(script), "--model", "/x", "--threshold", "2", "--dry-run"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode != 0 and "threshold" in bad.stderr
