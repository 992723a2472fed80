"""The plugin and the client against the REAL ``sglang==0.5.23`` package, on CPU (``make test-sglang``).

Skipped unless ``import sglang`` works (``make test-sglang`` builds ``.venv-sglang`` with the pinned package and
this repository installed ``--no-deps``), and deselected from the default suite by the ``sglang_pkg`` marker.

* The plugin is loaded by SGLang's own plugin loader (the ``sglang.srt.plugins`` entry point, ``SGLANG_PLUGINS``):
  the algorithm lands in SGLang's registry and the AROUND hook on ``process_batch_result_dllm`` is applied.
* ``scripts/launch_sglang.sh``'s command line is parsed by 0.5.23's own argument parser and resolved into a real
  `ServerArgs` and `DllmConfig` (YAML block size, algorithm config accepted by the plugin).
* Decoding through SGLang's real request/scheduler/output code (tests/sglang_real_utils.py) with the tiny lrl
  model's logits gives the native engine's tokens, step maps and sampling log-probs in ``meta_info``.
* The client (`SGLangRolloutGenerator`) talks HTTP to 0.5.23's real FastAPI app (its routes parse every payload
  into 0.5.23's request classes); only the tokenizer manager behind the routes is a stand-in, and it serves
  ``/generate`` with the same real decoding path.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from array import array
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.sglang_pkg
if os.environ.get("LRL_REQUIRE_SGLANG"):  # make test-sglang: a missing or broken package is an error, not a skip
    import sglang  # noqa: F401
else:
    sglang = pytest.importorskip("sglang", reason="needs the sglang==0.5.23 package (make test-sglang)")

from sglang_real_utils import (  # noqa: E402
    FakeTokenizerManager,
    MiniScheduler,
    RealSGLangApp,
    TinyModelRunner,
    engine_attention,
)

from lrl.rollout import NativeEngine, SamplingParams  # noqa: E402
from lrl.rollout import sglang_plugin as plugin  # noqa: E402
from lrl.rollout.sglang_client import SGLangRolloutGenerator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["abc", "hello w", "hello world", "The quick brown"]  # lengths 3, 7, 11, 15: + 17 is block-aligned


@pytest.fixture(scope="module")
def sgl_ckpt(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint as SGLang's config loader reads it: ``model_type`` qwen3 (transformers knows it; real
    SDAR checkpoints bring remote code instead), architecture ``SDARForCausalLM`` (what selects the dLLM path)."""
    out = tmp_path_factory.mktemp("sgl") / "tiny_sdar"
    out.mkdir()
    for f in Path(tiny_checkpoint).iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    cfg = json.loads((Path(tiny_checkpoint) / "config.json").read_text())
    assert cfg["architectures"] == ["SDARForCausalLM"]
    cfg["model_type"] = "qwen3"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def sgl(sgl_ckpt):
    """SGLang's plugin loader run as the server runs it, and a runtime context published from real ServerArgs."""
    from sglang.srt import plugins
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    os.environ["SGLANG_PLUGINS"] = "lrl_dllm"
    plugins.load_plugins()
    sa = ServerArgs(model_path=str(sgl_ckpt), dllm_algorithm=plugin.ALGORITHM_NAME, device="cpu",
                    max_running_requests=8, trust_remote_code=True)
    publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=None))
    return sa


def _dllm_config(mask_id: int, *, fdfo: bool = True, **algo):
    from sglang.srt.dllm.config import DllmConfig

    algo = {"block_size": 4, **algo}
    return DllmConfig(algorithm=plugin.ALGORITHM_NAME, algorithm_config=algo, block_size=4, mask_id=mask_id,
                      max_running_requests=8, first_done_first_out_mode=fdfo)


def _req(rid: str, ids: list[int], sampling: dict, cfg, eos: int, vocab: int):
    """A real SGLang `Req`, with the client's ``sampling_params`` dict turned into SGLang's `SamplingParams` the way
    its tokenizer manager does (``SamplingParams(**d)``, ``normalize``, ``verify``)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams as SglSamplingParams

    sp = SglSamplingParams(**sampling)
    sp.normalize(None)
    sp.verify(vocab)
    return Req(rid, "", array("q", ids), sp, dllm_config=cfg, eos_token_ids={eos})


def serve_with_sglang(lm, tok, prompts: list[list[int]], sp: SamplingParams, *, fdfo: bool = True,
                      seeds: list[int] | None = None, sampling: list[SamplingParams] | None = None):
    """Decode ``prompts`` through SGLang's real dLLM path with the plugin's algorithm; returns (served, runner)."""
    from sglang.srt.dllm.algorithm import get_algorithm

    mask = lm.bd.mask_token_id
    cfg = _dllm_config(mask, fdfo=fdfo, threshold=sp.threshold, strategy=sp.remasking_strategy,
                       denoising_steps=sp.denoising_steps, seed=sp.seed)
    algo = get_algorithm(cfg)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    sampling = sampling or [sp] * len(prompts)
    reqs = [_req(f"r{i}", p, SGLangRolloutGenerator.sglang_sampling_params(s, 0), cfg, tok.eos_token_id, vocab)
            for i, (p, s) in enumerate(zip(prompts, sampling))]
    max_len = max(len(p) for p in prompts) + sp.max_new_tokens + 2 * cfg.block_size
    runner = TinyModelRunner(lm, len(prompts), max_len, mask)
    sched = MiniScheduler(algo, cfg, runner, vocab)
    with engine_attention(lm):
        served = sched.run(reqs)
    assert sched.leftover_info == []  # the plugin's hook took its records off logits_output every round
    assert sorted(sched.released) == sorted(r.rid for r in reqs)  # every request finished through SGLang's path
    return [served[f"r{i}"] for i in range(len(prompts))], runner


def _ids(tok, prompts):
    return [tok(p, add_special_tokens=False).input_ids for p in prompts]


# ---------------------------------------------------------------------------------------------- loading
def test_plugin_loaded_by_sglang_loader(sgl):
    from importlib.metadata import entry_points

    from sglang.srt.dllm.algorithm import algo_name_to_cls, get_algorithm_cls
    from sglang.srt.dllm.algorithm.base import DllmAlgorithm
    from sglang.srt.dllm.algorithm.low_confidence import LowConfidence
    from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group
    from sglang.srt.plugins.hook_registry import HookRegistry

    eps = {ep.name: ep.value for ep in entry_points(group=GENERAL_PLUGINS_GROUP)}
    assert eps.get("lrl_dllm") == "lrl.rollout.sglang_plugin:register"
    cls = get_algorithm_cls(plugin.ALGORITHM_NAME)
    assert cls is algo_name_to_cls[plugin.ALGORITHM_NAME] and issubclass(cls, LowConfidence)
    assert issubclass(cls, DllmAlgorithm) and cls.__name__ == plugin.ALGORITHM_NAME
    wrapped = SchedulerDllmMixin.process_batch_result_dllm
    assert plugin.HOOK_TARGET in HookRegistry._patched and getattr(wrapped, "__wrapped__", None) is not None
    assert [h for _, h, _ in HookRegistry._hooks[plugin.HOOK_TARGET]] == [plugin.around_process_batch_result_dllm]
    # the SGLANG_PLUGINS whitelist is honoured: another name leaves our plugin out
    old = os.environ["SGLANG_PLUGINS"]
    try:
        os.environ["SGLANG_PLUGINS"] = "someone_else"
        assert "lrl_dllm" not in load_plugins_by_group(GENERAL_PLUGINS_GROUP)
        os.environ["SGLANG_PLUGINS"] = "lrl_dllm"
        assert "lrl_dllm" in load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    finally:
        os.environ["SGLANG_PLUGINS"] = old


def test_launch_script_parsed_by_sglang(sgl, sgl_ckpt, tmp_path):
    """The launcher's command line, parsed and resolved by 0.5.23's own server arguments and DllmConfig."""
    import argparse

    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.dllm.algorithm import get_algorithm
    from sglang.srt.dllm.config import DllmConfig
    from sglang.srt.server_args import ServerArgs

    out = subprocess.run(["bash", str(REPO / "scripts/launch_sglang.sh"), "--model", str(sgl_ckpt), "--port", "30123",
                          "--block-size", "4", "--threshold", "0.7", "--strategy", "low_confidence_static",
                          "--denoising-steps", "2", "--max-running-requests", "16", "--mem-fraction", "0.55",
                          "--config-dir", str(tmp_path), "--dry-run", "--", "--device", "cpu"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("SGLANG_PLUGINS=")][-1]
    words = shlex.split(line)
    assert words[0] == "SGLANG_PLUGINS=lrl_dllm"
    argv = words[words.index("sglang.launch_server") + 1 :]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    sa = ServerArgs.from_cli_args(parser.parse_args(argv))
    assert sa.dllm_algorithm == plugin.ALGORITHM_NAME and sa.dllm_fdfo is True
    assert sa.mem_fraction_static == pytest.approx(0.55) and sa.enable_memory_saver is True
    assert sa.max_running_requests == 16 and sa.tp_size == 1 and sa.port == 30123
    sa.resolve_once()
    view = resolving_view(sa)
    assert view.page_size == 4  # SGLang's dLLM fix-up: page size = block size (it read our YAML)
    assert view.disable_overlap_schedule is True
    cfg = DllmConfig.from_server_args(sa)
    assert (cfg.block_size, cfg.mask_id, cfg.max_running_requests) == (4, 151669, 16)  # SDAR's mask id
    algo = get_algorithm(cfg)
    assert type(algo).__name__ == plugin.ALGORITHM_NAME and algo.block_size == 4 and algo.fdfo
    assert algo.lrl_cfg == plugin.PluginAlgoConfig(block_size=4, strategy="low_confidence_static", threshold=0.7,
                                                   denoising_steps=2, seed=0)


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("strategy,fdfo", [("low_confidence_dynamic", True), ("low_confidence_static", True),
                                           ("sequential", True), ("low_confidence_dynamic", False)])
def test_greedy_through_sglang_equals_native(sgl, tiny_lm, tiny_tokenizer, strategy, fdfo):
    sp = SamplingParams(block_size=4, remasking_strategy=strategy, threshold=0.3, denoising_steps=2, greedy=True,
                        max_new_tokens=17, stop_token_ids=(tiny_tokenizer.eos_token_id,))
    prompts = _ids(tiny_tokenizer, PROMPTS)
    ref = NativeEngine(tiny_lm, tiny_tokenizer).generate(prompts, sp)
    served, _ = serve_with_sglang(tiny_lm, tiny_tokenizer, prompts, sp, fdfo=fdfo)
    for k, s in enumerate(served):
        meta = s.meta_info
        assert s.output_ids == ref.response_ids[k], PROMPTS[k]
        assert meta[plugin.STEP_MAP_KEY] == ref.step_maps[k], PROMPTS[k]
        assert len(set(meta[plugin.STEP_MAP_KEY])) == int(ref.num_forwards[k])
        torch.testing.assert_close(torch.tensor(meta[plugin.LOGPROB_KEY]), torch.tensor(ref.sampling_logprobs[k]))
        # SGLang runs the KV-commit forward of the final block too: one store pass more than native (documented)
        assert meta[plugin.STORE_KEY][-1] == int(ref.num_store_passes[k]) + 1
        assert meta["finish_reason"]["type"] == ref.finish_reasons[k]


def test_sampled_through_sglang_equals_reference(sgl, tiny_lm, tiny_tokenizer):
    """One request at a time: the plugin's generator (seeded with the YAML ``seed``) draws in position order, so
    the result equals the slow reference driven by that stream. (The native engine keys its draws per row, so its
    samples differ: same distribution, other draws; docs/sglang.md.)"""
    from decode_reference import reference_decode

    pad = NativeEngine(tiny_lm, tiny_tokenizer).pad_id
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 20, 0.9)]:
        sp = SamplingParams(block_size=4, threshold=0.2, temperature=temperature, top_k=top_k, top_p=top_p,
                            max_new_tokens=17, seed=123)
        for prompt in _ids(tiny_tokenizer, PROMPTS[:2]):
            lps: list[float] = []
            ids, steps, _ = reference_decode(tiny_lm, prompt, sp, pad, generator=torch.Generator().manual_seed(123),
                                             logprobs=lps)
            (s,), _ = serve_with_sglang(tiny_lm, tiny_tokenizer, [prompt], sp)
            assert s.output_ids == ids
            assert s.meta_info[plugin.STEP_MAP_KEY] == steps
            torch.testing.assert_close(torch.tensor(s.meta_info[plugin.LOGPROB_KEY]), torch.tensor(lps))


def test_group_samples_differ_and_greedy_rows_stay_native(sgl, tiny_lm, tiny_tokenizer):
    """A GRPO group (one prompt, four sampled rows) next to a greedy row in the same batches: SGLang's per-request
    temperatures reach the plugin (stock 0.5.23 would return four identical greedy answers), the greedy row is
    untouched by its sampled neighbours."""
    prompt = _ids(tiny_tokenizer, ["hello w"])[0]
    greedy = SamplingParams(block_size=4, threshold=0.2, greedy=True, max_new_tokens=17)
    sampled = SamplingParams(block_size=4, threshold=0.2, temperature=1.0, max_new_tokens=17, seed=5)
    ref = NativeEngine(tiny_lm, tiny_tokenizer).generate([prompt], greedy)
    served, _ = serve_with_sglang(tiny_lm, tiny_tokenizer, [prompt] * 5, sampled,
                                  sampling=[greedy] + [sampled] * 4)
    assert served[0].output_ids == ref.response_ids[0]
    assert served[0].meta_info[plugin.STEP_MAP_KEY] == ref.step_maps[0]
    group = [tuple(s.output_ids) for s in served[1:]]
    assert len(set(group)) > 1, group
    for s in served[1:]:
        lp = s.meta_info[plugin.LOGPROB_KEY]
        assert len(lp) == len(s.output_ids) and all(x <= 0.0 for x in lp)


def test_stop_inside_a_block_truncates_step_map(sgl, tiny_lm, tiny_tokenizer):
    """A stop token in the middle of a block: SGLang's ``finished_len`` cuts ``output_ids`` and (through the output
    streamer's token slicing) the step map and log-probs at the same place as the native engine."""
    stop = 81  # the tiny model's greedy answers contain it early (e.g. "abc" -> 48 79 81 ...)
    sp = SamplingParams(block_size=4, threshold=0.3, greedy=True, max_new_tokens=17,
                        stop_token_ids=(stop, tiny_tokenizer.eos_token_id))
    prompts = _ids(tiny_tokenizer, PROMPTS)
    ref = NativeEngine(tiny_lm, tiny_tokenizer).generate(prompts, sp)
    served, _ = serve_with_sglang(tiny_lm, tiny_tokenizer, prompts, sp)
    mid_block = 0
    for k, s in enumerate(served):
        assert s.output_ids == ref.response_ids[k]
        assert s.meta_info[plugin.STEP_MAP_KEY] == ref.step_maps[k]
        assert len(s.meta_info[plugin.LOGPROB_KEY]) == len(s.output_ids)
        if s.meta_info["finish_reason"] == {"type": "stop", "matched": stop}:
            mid_block += (len(prompts[k]) + len(s.output_ids)) % 4 != 0
    assert mid_block >= 1  # the case under test happened


def test_run_returns_dllm_run_output(sgl, tiny_lm, tiny_tokenizer):
    """``run`` returns 0.5.23's ``DllmRunOutput`` as ``_forward_batch_generation_dllm`` unpacks it, with the
    plugin's block records riding on ``logits_output.customized_info`` (FDFO: one round; sync: whole blocks)."""
    from sglang.srt.dllm.algorithm import get_algorithm
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    mask = tiny_lm.bd.mask_token_id
    for fdfo in (True, False):
        algo = get_algorithm(_dllm_config(mask, fdfo=fdfo, threshold=0.0))  # threshold 0: one step per block
        runner = TinyModelRunner(tiny_lm, 2, 16, mask)
        tokens = torch.tensor([[mask] * 4, [mask] * 4])
        fb = ForwardBatch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=2, input_ids=tokens.reshape(-1).clone(),
                          req_pool_indices=torch.tensor([0, 1]), seq_lens=torch.tensor([4, 4]),
                          out_cache_loc=torch.zeros(8, dtype=torch.long), seq_lens_sum=8)
        with engine_attention(tiny_lm):
            out = algo.run(runner, fb, [None, None] if fdfo else None)
        assert isinstance(out, tuple) and len(out) == 5
        logits_output, next_ids, accept, states, graph = out
        assert isinstance(logits_output, LogitsProcessorOutput) and graph is False
        assert (fb.input_ids == mask).sum() == 0  # threshold 0 unmasks the whole block in one step
        if fdfo:  # first round: the block was denoised but its KV-commit forward is still due: no record yet
            assert [len(x) for x in next_ids] == [4, 4] and accept == [0, 0]
            assert logits_output.customized_info is None
            assert all(isinstance(s, plugin.BlockStepState) and s.step_map == [1, 1, 1, 1] for s in states)
            out = algo.run(runner, fb, states)
            assert out[2] == [4, 4] and out[3] == [None, None]
            records = out[0].customized_info[plugin._RECORD_KEY]
        else:  # synchronous: the block and its commit forward in one call; slices from the first mask position
            records = logits_output.customized_info[plugin._RECORD_KEY]
            assert accept is None and states is None and [len(x) for x in next_ids] == [4, 4]
        assert [r.step_map for r in records] == [(1, 1, 1, 1)] * 2 and [r.forwards for r in records] == [2, 2]


def test_validate_request_refuses_what_the_plugin_ignores(sgl, tiny_tokenizer):
    """SGLang's scheduler aborts a request when the algorithm's ``validate_request`` returns a message; features the
    dLLM path would silently drop are refused, what the client sends is accepted."""
    cfg = _dllm_config(2)
    client = SGLangRolloutGenerator.sglang_sampling_params(
        SamplingParams(block_size=4, temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=8, stop_token_ids=(0,)), 7)
    assert cfg.validate_request(_req("ok", [3, 4], client, cfg, 0, 101)) is None
    for extra, name in [({"repetition_penalty": 1.2}, "repetition_penalty"), ({"min_p": 0.1}, "min_p"),
                        ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"regex": "a+"}, "regex")]:
        msg = cfg.validate_request(_req("bad", [3, 4], {**client, **extra}, cfg, 0, 101))
        assert msg is not None and name in msg and plugin.ALGORITHM_NAME in msg
    req = _req("lp", [3, 4], client, cfg, 0, 101)
    req.return_logprob = True
    assert "return_logprob" in cfg.validate_request(req)


# ---------------------------------------------------------------------------------------------- client over HTTP
@pytest.fixture(scope="module")
def sglang_app(sgl, tiny_tokenizer, sgl_ckpt):
    """0.5.23's real FastAPI app on a loopback port; behind it a stand-in tokenizer manager serving the tiny model
    through the plugin and SGLang's real dLLM request/output path."""
    from sglang.srt.dllm.algorithm import get_algorithm

    from lrl.models import build_tiny_model

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0).eval()  # its own copy: weight syncs change it
    cfg = _dllm_config(lm.bd.mask_token_id, threshold=0.3)
    tm = FakeTokenizerManager(lm, cfg, lambda: get_algorithm(cfg), str(sgl_ckpt))
    app = RealSGLangApp(tm)
    yield app, tm, lm
    app.stop()


def _client(app, tiny_checkpoint, **kw):
    return SGLangRolloutGenerator([app.url], str(tiny_checkpoint), server_tp_sizes=[1], health_timeout_s=60,
                                  timeout_s=120, **kw)


def _calls(tm, name):
    return [obj for n, obj in tm.calls if n == name]


def _assert_rollouts_equal_native(batch, ref):
    assert batch.response_ids == ref.response_ids
    assert batch.step_maps == ref.step_maps
    assert batch.num_forwards.tolist() == ref.num_forwards.tolist()
    assert batch.finish_reasons == ref.finish_reasons
    assert (batch.num_store_passes - ref.num_store_passes).tolist() == [1] * len(ref.response_ids)  # documented
    for got, want in zip(batch.sampling_logprobs, ref.sampling_logprobs):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want))


def test_client_generates_through_real_sglang_routes(sglang_app, tiny_checkpoint, tiny_tokenizer):
    from sglang.srt.managers.io_struct import GenerateReqInput

    app, tm, lm = sglang_app
    sp = SamplingParams(block_size=4, threshold=0.3, greedy=True, max_new_tokens=17, samples_per_prompt=2,
                        stop_token_ids=(tiny_tokenizer.eos_token_id,))
    client = _client(app, tiny_checkpoint, max_rows_per_request=3)
    try:
        batch = client.generate(PROMPTS, sp)
    finally:
        client.close()
    ref = NativeEngine(lm, tiny_tokenizer).generate(PROMPTS, sp)
    _assert_rollouts_equal_native(batch, ref)
    reqs = _calls(tm, "generate")
    assert len(reqs) == 3 and all(isinstance(r, GenerateReqInput) for r in reqs)  # 8 rows in chunks of 3
    assert sorted(r.batch_size for r in reqs) == [2, 3, 3]


def test_client_weight_sync_payloads_parsed_by_real_routes(sglang_app, tiny_checkpoint, tiny_tokenizer, tmp_path):
    """Disk and distributed (gloo) sync through 0.5.23's routes: every body parses into its request class with the
    intended values, the served weights are the policy's, and rollouts then carry the new ``weight_version``."""
    from sglang.srt.managers.io_struct import (
        BeginWeightUpdateReqInput,
        DestroyWeightsUpdateGroupReqInput,
        EndWeightUpdateReqInput,
        InitWeightsUpdateGroupReqInput,
        UpdateWeightFromDiskReqInput,
        UpdateWeightsFromDistributedReqInput,
    )

    from lrl.models import build_tiny_model

    app, tm, lm = sglang_app
    policy = build_tiny_model(tiny_tokenizer, block_size=4, seed=1)
    disk = _client(app, tiny_checkpoint, sync_dir=str(tmp_path / "sync"))
    try:
        disk.sync_from_model(policy, version=1)
        (obj,) = _calls(tm, "update_weights_from_disk")
        assert isinstance(obj, UpdateWeightFromDiskReqInput) and obj.weight_version == "1"
        assert obj.flush_cache is True and obj.abort_all_requests is False and obj.load_format is None
        assert Path(obj.model_path).is_dir() and str(tmp_path) in obj.model_path
        for k, v in policy.model.state_dict().items():
            torch.testing.assert_close(lm.model.state_dict()[k], v)
        sp = SamplingParams(block_size=4, threshold=0.3, greedy=True, max_new_tokens=17)
        batch = disk.generate(PROMPTS[:2], sp)  # meta_info.weight_version "1" is what the client now expects
        _assert_rollouts_equal_native(batch, NativeEngine(lm, tiny_tokenizer).generate(PROMPTS[:2], sp))
    finally:
        disk.close()

    policy2 = build_tiny_model(tiny_tokenizer, block_size=4, seed=2)
    dist = _client(app, tiny_checkpoint, weight_sync="distributed", dist_backend="gloo", bucket_bytes=64 << 10,
                   initial_weight_version=1, sync_timeout_s=60)
    try:
        dist.update_weights(policy2.model.state_dict(), version=2)
    finally:
        dist.close()
    names = [n for n, _ in tm.calls if n not in ("generate", "update_weights_from_disk")]
    n_buckets = len(_calls(tm, "update_weights_from_distributed"))
    assert names == ["init_weights_update_group", "begin_weight_update",
                     *["update_weights_from_distributed"] * n_buckets, "end_weight_update",
                     "destroy_weights_update_group"]
    (begin,) = _calls(tm, "begin_weight_update")
    (group,) = _calls(tm, "init_weights_update_group")
    buckets = _calls(tm, "update_weights_from_distributed")
    assert isinstance(begin, BeginWeightUpdateReqInput) and begin.selector == "all"
    assert isinstance(group, InitWeightsUpdateGroupReqInput) and (group.rank_offset, group.world_size) == (1, 2)
    assert group.backend == "gloo" and group.group_name == dist.group_name
    assert len(buckets) > 1 and all(isinstance(b, UpdateWeightsFromDistributedReqInput) for b in buckets)
    assert [b.weight_version for b in buckets] == [None] * (len(buckets) - 1) + ["2"]
    assert [b.flush_cache for b in buckets] == [False] * (len(buckets) - 1) + [True]
    assert sorted(n for b in buckets for n in b.names) == sorted(policy2.model.state_dict())
    assert isinstance(_calls(tm, "end_weight_update")[0], EndWeightUpdateReqInput)
    assert isinstance(_calls(tm, "destroy_weights_update_group")[0], DestroyWeightsUpdateGroupReqInput)
    for k, v in policy2.model.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[k], v)
    assert tm.weight_version == "2"


def test_release_resume_payloads_parsed_by_real_routes(sglang_app, tiny_checkpoint, tiny_tokenizer):
    """The colocated-training hooks: bodies parse into 0.5.23's memory-occupation request classes with the tags
    SGLang knows, in the order its RL guide gives; the next rollout still decodes natively."""
    from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput, ResumeMemoryOccupationReqInput

    app, tm, lm = sglang_app
    start = len(tm.calls)
    client = _client(app, tiny_checkpoint, release_tags=["weights", "kv_cache"], expected_server_version=None)
    try:
        client.release_memory()
        client.resume_memory()
        client.release_memory()
        sp = SamplingParams(block_size=4, threshold=0.3, greedy=True, max_new_tokens=17)
        batch = client.generate(PROMPTS[:1], sp)  # resumes by itself before generating
    finally:
        client.close()
    mem = [(n, obj) for n, obj in tm.calls[start:] if "memory" in n]
    assert [n for n, _ in mem] == ["release_memory_occupation", "resume_memory_occupation",
                                   "resume_memory_occupation"] * 2
    for n, obj in mem:
        assert isinstance(obj, ReleaseMemoryOccupationReqInput if n.startswith("release")
                          else ResumeMemoryOccupationReqInput)
    assert [obj.tags for _, obj in mem[:3]] == [["weights", "kv_cache"], ["weights"], ["kv_cache"]]
    _assert_rollouts_equal_native(batch, NativeEngine(lm, tiny_tokenizer).generate(PROMPTS[:1], sp))
