"""A CPU stand-in for SGLang 0.5.23's dLLM serving loop, built from the installed package's REAL pieces.

Used by tests/test_sglang_real.py (``make test-sglang``; needs ``sglang==0.5.23``, no GPU). Real: the algorithm
class (as registered by SGLang's plugin loader), `DllmConfig`, `Req` (finish / stop / length rules), `SamplingParams`
(normalisation of the client's payload), `SamplingBatchInfo.from_schedule_batch`, `ForwardBatch`,
`LogitsProcessorOutput`, `ModelRunnerOutput`, `GenerationBatchResult`, the (plugin-hooked)
``SchedulerDllmMixin.process_batch_result_dllm``, `SchedulerOutputStreamer` (token slicing of ``customized_info``),
`BatchTokenIDOutput`, the detokenizer's ``handle_batch_token_id_out`` and the tokenizer manager's
``update_request_meta_info``. Stand-ins: the model runner (the tiny lrl model on CPU, KV in lrl's own cache), the
block scheduling (one block per request per round, block-aligned, as ``PrefillAdder`` does for LowConfidence-like
algorithms), the KV allocator/tree cache (no-ops) and the detokenizer's text decoding (empty strings).
"""

from __future__ import annotations

import contextlib
import types
from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch


def engine_attention(lm):
    """The attention path the native engine uses (so both sides compute identical logits)."""
    from lrl.rollout import engine

    fast = getattr(engine, "_fast_attention", None)
    return fast(lm) if fast is not None else contextlib.nullcontext()


class _Recorder:
    """Stands in for the scheduler's zmq socket to the detokenizer."""

    def __init__(self):
        self.sent = []

    def send_output(self, payload):
        self.sent.append(payload)


class _BatchRef:
    """What ``SamplingBatchInfo.from_schedule_batch`` reads of a ``ScheduleBatch`` (it keeps a weak reference)."""

    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


class TinyModelRunner:
    """SGLang's ``ModelRunner.forward`` contract over the tiny lrl model: one forward of each row's current block.

    ``req_pool_indices`` are the cache rows. A forward whose block has no mask left (the KV-commit pass, or a prompt
    block) stores the block's KV, as SGLang keeps the final block KV; other forwards leave the cache as it was.
    """

    def __init__(self, lm, n_rows: int, max_len: int, mask_id: int):
        from sglang.srt.layers.logits_processor import LogitsProcessorOutput
        from sglang.srt.model_executor.model_runner import ModelRunnerOutput

        self._lpo, self._out = LogitsProcessorOutput, ModelRunnerOutput
        self.lm, self.mask_id = lm, mask_id
        self.cache = lm.new_cache(n_rows, max_len)
        self.forwards = 0
        self.logits_log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, tokens, logits)

    @torch.no_grad()
    def forward(self, forward_batch, pp_proxy_tensors=None):
        bsz = forward_batch.batch_size
        tokens = forward_batch.input_ids.view(bsz, -1).clone()
        t = tokens.shape[1]
        rows = forward_batch.req_pool_indices
        # a row whose block KV is already stored (synchronous mode keeps running finished rows until the whole
        # batch is done) would run at the wrong positions: its logits are unused, give it zeros
        fresh = self.cache.lengths[rows] == forward_batch.seq_lens - t
        logits = torch.zeros(bsz, t, self.lm.model.get_output_embeddings().weight.shape[0])
        if bool(fresh.any()):
            commit = ~(tokens[fresh] == self.mask_id).any(1)
            logits[fresh] = self.lm.forward_chunk(self.cache, tokens[fresh], rows=rows[fresh], block_size=t,
                                                  store=torch.where(commit, t, 0)).float()
        self.forwards += 1
        self.logits_log.append((rows.clone(), tokens, logits.clone()))
        lo = self._lpo(next_token_logits=None, full_logits=logits.reshape(-1, logits.shape[-1]))
        return self._out(logits_output=lo, can_run_graph=False)


@dataclass
class Served:
    """What the client receives for one request: ``output_ids`` and ``meta_info`` as the tokenizer manager builds."""

    rid: str
    output_ids: list[int] = field(default_factory=list)
    meta_info: dict = field(default_factory=dict)
    state: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(customized_info_accumulated={},
                                                                           customized_info_reported_keys=set()))


class MiniScheduler:
    """Rounds of (build one block per live request) → ``algorithm.run`` → ``process_batch_result_dllm`` →
    streamer → detokenizer → ``meta_info``, until every request has finished."""

    def __init__(self, algo, dllm_config, runner: TinyModelRunner, vocab_size: int, context_len: int = 4096):
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.dllm.mixin.scheduler import SchedulerDllmMixin
        from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        self.algo, self.cfg, self.runner, self.vocab_size = algo, dllm_config, runner, vocab_size
        self.socket = _Recorder()
        self.leftover_info: list[dict] = []
        noop = lambda *a, **k: None  # noqa: E731
        self.sched = SimpleNamespace(
            dllm_config=dllm_config,
            token_to_kv_pool_allocator=SimpleNamespace(free_group_begin=noop, free_group_end=noop),
            metrics_reporter=SimpleNamespace(num_generated_tokens=0, report_prefill_stats=noop),
            model_config=SimpleNamespace(context_len=context_len),
            tree_cache=None,
            output_streamer=SchedulerOutputStreamer(
                send_to_detokenizer=self.socket, tree_cache=None, server_args=None, is_generation=True,
                spec_algorithm=SpeculativeAlgorithm.NONE, disaggregation_mode=DisaggregationMode.NULL,
                enable_hicache_storage=lambda: False),
        )
        self.sched._finish_dllm_request_if_needed = types.MethodType(
            SchedulerDllmMixin._finish_dllm_request_if_needed, self.sched)
        # looked up on the class at call time: the plugin's AROUND hook, when applied, is what runs
        self.process = lambda batch, result: SchedulerDllmMixin.process_batch_result_dllm(self.sched, batch, result)

    def _open_block(self, req) -> None:
        """Lay the next block of ``req`` (SGLang's canvas: prompt + output + [MASK] * block_size, block-aligned)."""
        bs = self.cfg.block_size
        start = req.lrl_block_start
        committed = list(req.origin_input_ids) + list(req.output_ids)
        canvas = committed + [self.cfg.mask_id] * bs
        req.full_untruncated_fill_ids = array("q", canvas)
        req.extend_end = start + bs
        req.lrl_block = canvas[start : start + bs]

    def run(self, reqs: list) -> dict[str, Served]:
        from sglang.srt.dllm.mixin import scheduler as mixin

        # the KV pool / radix tree are not modelled: releasing a finished request's KV is recorded, not done
        original, self.released = mixin.release_kv_cache, []
        mixin.release_kv_cache = lambda req, tree_cache, *, checkpoint: self.released.append(req.rid)
        try:
            return self._run(reqs)
        finally:
            mixin.release_kv_cache = original

    def _run(self, reqs: list) -> dict[str, Served]:
        from sglang.srt.managers.utils import GenerationBatchResult
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
        from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

        bs = self.cfg.block_size
        served = {r.rid: Served(r.rid) for r in reqs}
        for i, r in enumerate(reqs):
            r.lrl_row, r.lrl_block_start = i, 0
            self._open_block(r)
        rounds = 0
        while not all(r.finished() for r in reqs):
            rounds += 1
            if rounds > 10_000:
                raise RuntimeError("mini scheduler did not terminate")
            live = [r for r in reqs if not r.finished()]
            n = len(live)
            input_ids = torch.tensor([r.lrl_block for r in live], dtype=torch.long).reshape(-1)
            fb = ForwardBatch(forward_mode=ForwardMode.DLLM_EXTEND, batch_size=n, input_ids=input_ids,
                              req_pool_indices=torch.tensor([r.lrl_row for r in live]),
                              seq_lens=torch.tensor([r.extend_end for r in live]),
                              out_cache_loc=torch.zeros(n * bs, dtype=torch.long),
                              seq_lens_sum=sum(r.extend_end for r in live))
            fb.sampling_info = SamplingBatchInfo.from_schedule_batch(_BatchRef(live), self.vocab_size)
            algo_states = [r.dllm_algo_state for r in live] if self.cfg.first_done_first_out_mode else None
            logits_output, next_ids, accept, states, graph = self.algo.run(self.runner, fb, algo_states)
            result = GenerationBatchResult(logits_output=logits_output, next_token_ids=next_ids,
                                           accept_length_per_req_cpu=accept, dllm_algo_state=states,
                                           can_run_cuda_graph=graph)
            batch = SimpleNamespace(reqs=live, batch_size=lambda n=n: n, return_logprob=False,
                                    forward_mode=ForwardMode.DLLM_EXTEND, prefill_stats=None,
                                    dp_cooperation_info=None)
            n_sent = len(self.socket.sent)
            self.process(batch, result)
            if getattr(logits_output, "customized_info", None):  # the hook must have consumed the records
                self.leftover_info.append(dict(logits_output.customized_info))
            for payload in self.socket.sent[n_sent:]:
                self._deliver(payload, served)
            for r in live:
                if r.finished():
                    continue
                if self.cfg.first_done_first_out_mode and r.dllm_incomplete_ids:
                    r.lrl_block = list(r.dllm_incomplete_ids)  # same block, next FDFO round
                    continue
                r.lrl_block_start += bs
                self._open_block(r)
        return served

    def _deliver(self, payload, served: dict[str, Served]) -> None:
        """Detokenizer (real handler, text decoding stubbed) → tokenizer manager's meta_info accumulation (real)."""
        from sglang.srt.managers.detokenizer_manager import DetokenizerManager
        from sglang.srt.managers.io_struct import unwrap_from_pickle
        from sglang.srt.managers.tokenizer_manager import TokenizerManager

        detok = SimpleNamespace(_decode_batch_token_id_output=lambda obj: [""] * len(obj.rids),
                                _b64_encode_per_request=DetokenizerManager._b64_encode_per_request)
        out = DetokenizerManager.handle_batch_token_id_out(detok, payload)
        info = unwrap_from_pickle(out.customized_info) if out.customized_info is not None else None
        tm = SimpleNamespace(_accumulate_request_meta_info=TokenizerManager._accumulate_request_meta_info)
        for i, rid in enumerate(out.rids):
            s = served[rid]
            s.output_ids.extend(int(t) for t in out.output_ids[i])
            meta = {"id": rid, "finish_reason": out.finished_reasons[i], "completion_tokens": out.completion_tokens[i],
                    "weight_version": "default"}
            if info is not None:
                TokenizerManager.update_request_meta_info(tm, meta, s.state, info, i, out.finished_reasons[i])
            s.meta_info.update(meta)


def _group_worker(params: dict, conn) -> None:
    """The server's side of the weight-update group, in its own process (a process-group name can be registered
    once per process, and the trainer's rank 0 lives in the test process): join as ``rank_offset``, then receive
    rank 0's broadcasts for each ``(dtypes, shapes)`` sent over ``conn`` and send the tensors back."""
    import torch

    from lrl.rollout.weight_sync import destroy_process_group, init_custom_process_group

    try:
        pg = init_custom_process_group(**params, timeout_s=60)
    except Exception as exc:  # reported to the route
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        msg = conn.recv()
        if msg is None:
            destroy_process_group(pg)
            return
        tensors = [torch.empty(shape, dtype=getattr(torch, dt)) for dt, shape in msg]
        for w in [torch.distributed.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]:
            w.wait()
        conn.send(("ok", tensors))


class FakeTokenizerManager:
    """What 0.5.23's HTTP routes call on their tokenizer manager, backed by the MiniScheduler and the tiny model.

    The real routes (``sglang.srt.entrypoints.http_server.app``) have already parsed every body into 0.5.23's request
    classes when these methods run; each call is recorded in ``calls`` as (method, request object). Weight updates
    load into ``lm``; the distributed ones join the trainer's group as ``rank_offset`` and receive rank 0's
    broadcasts, as SGLang's model runner does.
    """

    def __init__(self, lm, dllm_config, make_algo, model_path: str):
        from sglang.srt.managers.tokenizer_manager import ServerStatus

        self.lm, self.cfg, self.make_algo = lm, dllm_config, make_algo
        self.model_path = self.served_model_name = model_path
        self.is_generation, self.gracefully_exit = True, False
        self.server_status = ServerStatus.Up
        self.last_receive_tstamp = 0.0
        self.rid_to_state: dict = {}
        self.weight_version = "default"
        self.model_config = SimpleNamespace(is_image_understandable_model=False, is_audio_understandable_model=False,
                                            hf_config=SimpleNamespace(model_type="qwen3",
                                                                      architectures=["SDARForCausalLM"]))
        self.calls: list[tuple[str, object]] = []
        self.groups: dict = {}
        self.bracket_open = False
        self.vocab = lm.model.get_output_embeddings().weight.shape[0]

    def config_value(self, name: str):
        return {"weight_version": self.weight_version}.get(name)

    def _serve(self, items) -> list[dict]:
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        reqs = []
        for it in items:
            sp = SamplingParams(**it.sampling_params)  # as TokenizerManager._create_tokenized_object
            sp.normalize(None)
            sp.verify(self.vocab)
            reqs.append(Req(it.rid, "", array("q", it.input_ids), sp, dllm_config=self.cfg,
                            eos_token_ids={int(self.lm.model.config.eos_token_id)}))
        bs = self.cfg.block_size
        max_len = max(len(r.origin_input_ids) + r.sampling_params.max_new_tokens for r in reqs) + 2 * bs
        runner = TinyModelRunner(self.lm, len(reqs), max_len, self.cfg.mask_id)
        with engine_attention(self.lm):
            served = MiniScheduler(self.make_algo(), self.cfg, runner, self.vocab).run(reqs)
        out = []
        for r in reqs:
            s = served[r.rid]
            out.append({"text": "", "output_ids": s.output_ids,
                        "meta_info": {**s.meta_info, "weight_version": self.weight_version}})
        return out

    async def generate_request(self, obj, request=None):
        import time

        from sglang.srt.constants import HEALTH_CHECK_RID_PREFIX

        if isinstance(obj.rid, str) and obj.rid.startswith(HEALTH_CHECK_RID_PREFIX):
            self.last_receive_tstamp = time.time() + 1.0
            yield {}
            return
        self.calls.append(("generate", obj))
        obj.normalize_batch_and_arguments()
        items = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
        out = self._serve(items)
        yield out[0] if obj.is_single else out

    async def update_weights_from_disk(self, obj, request=None):
        from lrl.rollout.weight_sync import read_hf_weights

        self.calls.append(("update_weights_from_disk", obj))
        self._load(read_hf_weights(obj.model_path).items(), obj.weight_version)
        return True, "ok", 0

    def _load(self, named, version) -> None:
        params = dict(self.lm.model.state_dict())
        with torch.no_grad():
            for name, t in named:
                params[name].copy_(t.to(params[name].dtype))
        if version is not None:
            self.weight_version = version

    async def begin_weight_update(self, obj, request=None):
        self.calls.append(("begin_weight_update", obj))
        ok, self.bracket_open = not self.bracket_open, True
        return ok, "" if ok else "a weight update is already open"

    async def end_weight_update(self, obj, request=None):
        self.calls.append(("end_weight_update", obj))
        self.bracket_open = False
        return True, ""

    async def init_weights_update_group(self, obj, request=None):
        import asyncio
        import multiprocessing as mp

        self.calls.append(("init_weights_update_group", obj))
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        params = {"backend": obj.backend, "init_method": f"tcp://{obj.master_address}:{obj.master_port}",
                  "world_size": obj.world_size, "rank": obj.rank_offset, "group_name": obj.group_name}
        proc = ctx.Process(target=_group_worker, args=(params, child), daemon=True)
        proc.start()
        status, detail = await asyncio.to_thread(conn.recv)
        if status != "ok":
            return False, detail
        self.groups[obj.group_name] = (proc, conn)
        return True, ""

    async def update_weights_from_distributed(self, obj, request=None):
        import asyncio

        self.calls.append(("update_weights_from_distributed", obj))
        if not self.bracket_open:  # 0.5.23's rule (SchedulerWeightUpdaterManager)
            return False, "must run between begin_weight_update() and end_weight_update()"
        _, conn = self.groups[obj.group_name]
        conn.send(list(zip(obj.dtypes, obj.shapes)))
        _, tensors = await asyncio.to_thread(conn.recv)
        self._load(zip(obj.names, tensors), obj.weight_version)
        return True, ""

    async def destroy_weights_update_group(self, obj, request=None):
        self.calls.append(("destroy_weights_update_group", obj))
        proc, conn = self.groups.pop(obj.group_name, (None, None))
        if proc is not None:
            conn.send(None)
            proc.join(timeout=30)
        return True, ""

    async def release_memory_occupation(self, obj, request=None):
        self.calls.append(("release_memory_occupation", obj))

    async def resume_memory_occupation(self, obj, request=None):
        self.calls.append(("resume_memory_occupation", obj))

    async def flush_cache(self, timeout_s: float = 0.0):
        self.calls.append(("flush_cache", timeout_s))
        return SimpleNamespace(success=True, message="")


class RealSGLangApp:
    """0.5.23's FastAPI app (``sglang.srt.entrypoints.http_server.app``) served by uvicorn on a loopback port, with
    ``tokenizer_manager`` behind its routes."""

    def __init__(self, tokenizer_manager):
        import socket
        import threading

        import uvicorn
        from sglang.srt.entrypoints import http_server

        http_server.set_global_state(http_server._GlobalState(tokenizer_manager=tokenizer_manager,
                                                              template_manager=None, scheduler_info={}))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(http_server.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start the SGLang app")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
