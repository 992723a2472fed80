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
