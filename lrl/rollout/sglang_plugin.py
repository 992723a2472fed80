"""SGLang plugin: sampled block-diffusion decoding with per-token step maps (SGLang 0.5.23, no fork).

Stock SGLang 0.5.23 decodes dLLMs greedily (``LowConfidence``) and reports nothing about denoising steps. This
plugin, loaded by SGLang's plugin framework through the ``sglang.srt.plugins`` entry point ``lrl_dllm``, adds:

* an algorithm ``LRLLowConfidence`` (a ``LowConfidence`` subclass inserted into
  ``sglang.srt.dllm.algorithm.algo_name_to_cls``) whose step calls the SAME decode-step rule as the native engine
  (`lrl.rollout.unmasking.sample_tokens` / `select_unmask`), with per-request temperature / top-k / top-p read from
  ``forward_batch.sampling_info`` and the unmasking strategy / threshold from ``--dllm-algorithm-config``;
* an AROUND hook on ``SchedulerDllmMixin.process_batch_result_dllm`` that turns the block-local step ids of every
  block committed in a scheduler round into request-global ids and appends them to
  ``req.customized_info["dllm_step_map"]``; SGLang's output streamer slices that list exactly like
  ``output_ids`` (stop truncation included), so the client receives ``meta_info["dllm_step_map"]`` aligned with
  ``output_ids``. ``dllm_nfe`` and ``dllm_store_passes`` travel the same way as per-token *cumulative* counters
  (``customized_info`` is token-sliced in 0.5.23); the request's value is the last element.
  ``dllm_sampling_logprobs`` travels the same way, one float per token: the log-probability the token was drawn
  with (`sample_tokens`' processed distribution), which the trainer compares with its own log-probs. SGLang
  truncates at the stop token, so the final block's positions after it are not reported (no exact terminal-block
  replay for SGLang rollouts; ``lrl serve`` reports them).

Launch: ``SGLANG_PLUGINS=lrl_dllm python -m sglang.launch_server --dllm-algorithm LRLLowConfidence
--dllm-algorithm-config cfg.yaml ...`` (see ``scripts/launch_sglang.sh``). Algorithm config keys: ``block_size``,
``strategy`` (``low_confidence_dynamic`` | ``low_confidence_static`` | ``sequential``), ``threshold``,
``denoising_steps``, ``seed``.

Semantics versus stock ``LowConfidence`` (greedy requests): stock commits positions whose argmax probability is
strictly ``> threshold`` (or the single most confident one if none is); our dynamic rule commits the most confident
position plus every position with confidence ``>= threshold``. The two agree except when a confidence equals the
threshold exactly; we keep ``>=`` so SGLang and native rollouts are identical. Counting: a block costs its
denoising steps plus one KV-commit forward (SGLang reports a block as done on the forward *after* its last mask
disappears); ``dllm_step_map`` counts only forwards that unmasked something (spec §2.5), ``dllm_store_passes``
counts the KV-commit forwards of generated blocks. Unlike the native engine, SGLang also runs that forward for
the final block, so ``dllm_store_passes`` is one higher there.

Random numbers: one ``torch.Generator`` per tensor-parallel rank, seeded with the config's ``seed`` (default 0), so
all TP ranks draw identical tokens. Per-request ``sampling_seed`` is not honoured.

This module imports sglang only inside functions, so it can be imported (and its pure step logic tested) without
sglang installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lrl.rollout.unmasking import sample_tokens, select_unmask

logger = logging.getLogger(__name__)

ALGORITHM_NAME = "LRLLowConfidence"
STEP_MAP_KEY = "dllm_step_map"
NFE_KEY = "dllm_nfe"
STORE_KEY = "dllm_store_passes"
LOGPROB_KEY = "dllm_sampling_logprobs"
HOOK_TARGET = "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm"
_RECORD_KEY = "lrl_dllm_block_records"  # private key on logits_output.customized_info (algorithm → hook)
_COUNTERS_ATTR = "_lrl_dllm_counters"  # per-request running counters, kept on the SGLang Req object
_STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")
# Keys SGLang itself reads from the same YAML; accepted and ignored here.
_SGLANG_KEYS = {"capture_input_preparation"}


# ---------------------------------------------------------------------------------------------- pure step logic
@dataclass(frozen=True)
class PluginAlgoConfig:
    """Server-side decoding settings (the ``--dllm-algorithm-config`` YAML mapping).

    Args:
        block_size: Tokens per block (SGLang reads the same key; None = the architecture's default).
        strategy: Unmasking strategy, as in `lrl.rollout.types.SamplingParams.remasking_strategy`.
        threshold: Confidence threshold of the dynamic strategy.
        denoising_steps: Steps per block of the static and sequential strategies (k = block_size // steps).
        seed: Seed of the sampling generator (identical on every tensor-parallel rank).
    """

    block_size: int | None = None
    strategy: str = "low_confidence_dynamic"
    threshold: float = 0.9
    denoising_steps: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"{ALGORITHM_NAME} config: strategy must be one of {_STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"{ALGORITHM_NAME} config: threshold must be in [0, 1], got {self.threshold}")
        if int(self.denoising_steps) <= 0:
            raise ValueError(f"{ALGORITHM_NAME} config: denoising_steps must be > 0, got {self.denoising_steps}")
        if self.block_size is not None and int(self.block_size) <= 0:
            raise ValueError(f"{ALGORITHM_NAME} config: block_size must be > 0, got {self.block_size}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PluginAlgoConfig:
        """Parse the YAML mapping; unknown keys raise ``ValueError`` (typos must not silently change decoding)."""
        raw = dict(raw or {})
        if "remasking_strategy" in raw and "strategy" not in raw:  # accept the SamplingParams spelling too
            raw["strategy"] = raw.pop("remasking_strategy")
        known = {"block_size", "strategy", "threshold", "denoising_steps", "seed"}
        unknown = sorted(set(raw) - known - _SGLANG_KEYS)
        if unknown:
            raise ValueError(f"{ALGORITHM_NAME} config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    def tokens_per_step(self, block_size: int) -> int:
        return max(1, block_size // int(self.denoising_steps))


@dataclass(frozen=True)
class RowSampling:
    """Sampling controls of one request (hashable, so rows with equal settings are sampled together)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_sglang(cls, temperature: float, top_k: int, top_p: float) -> RowSampling:
        """Map SGLang's normalized request params: temperature 0 arrives as ``top_k == 1`` (and T = 1)."""
        top_k = int(top_k)
        if top_k == 1 or float(temperature) <= 0.0:
            return cls(greedy=True)
        return cls(greedy=False, temperature=float(temperature), top_k=0 if top_k < 0 else top_k,
                   top_p=float(top_p))


@dataclass
class BlockStepState:
    """Per-request state of the block being decoded (kept across FDFO rounds in ``req.dllm_algo_state``).

    Attributes:
        step_map: block-local 1-based step id of each block position (0: prompt position or still masked).
        logprobs: sampling log-prob of the token unmasked at each block position (0.0 until unmasked).
        steps: denoising forwards of this block that unmasked at least one position.
        forwards: forwards this block has cost so far (denoising forwards plus the final KV-commit forward).
        finished: the block was reported done (its record has been exported).
    """

    step_map: list[int]
    logprobs: list[float] | None = None  # None: zeros, one per position (set in __post_init__)
    steps: int = 0
    forwards: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        if self.logprobs is None:
            self.logprobs = [0.0] * len(self.step_map)

    @classmethod
    def new(cls, block_size: int) -> BlockStepState:
        return cls(step_map=[0] * block_size)


@dataclass(frozen=True)
class BlockRecord:
    """What the algorithm hands to the scheduler hook for a finished block."""

    step_map: tuple[int, ...]
    steps: int
    forwards: int
    logprobs: tuple[float, ...] = ()


def plugin_block_step(
    logits: torch.Tensor,
    block_tokens: torch.Tensor,
    mask_id: int,
    states: list[BlockStepState],
    sampling: list[RowSampling],
    algo_cfg: PluginAlgoConfig,
    generator: torch.Generator | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[bool], list[BlockRecord | None]]:
    """One denoising step of B blocks: the decode-step rule of the native engine, on SGLang's batch layout.

    Args:
        logits: (B, T, V) logits of the current blocks.
        block_tokens: (B, T) current block tokens (``mask_id`` where still masked).
        mask_id: the mask token id.
        states: B per-request `BlockStepState` (updated in place).
        sampling: B per-request `RowSampling`.
        algo_cfg: strategy, threshold, k.
        generator: random source of the sampled rows.
        prompt_mask: (B, T) bool, prompt positions inside the block (never unmasked). None: all mask tokens count.
    Returns:
        new block tokens (B, T); done flags (a block is done when it had no masked position at the start of this
        step, i.e. this forward was its KV-commit pass); for blocks that became done now, a `BlockRecord`.
    """
    b, t = block_tokens.shape
    if len(states) != b or len(sampling) != b:
        raise ValueError(f"plugin_block_step: {b} rows but {len(states)} states and {len(sampling)} sampling entries")
    masked = block_tokens == mask_id
    if prompt_mask is not None:
        masked = masked & ~prompt_mask.to(torch.bool)
    done = ~masked.any(1)
    conf = torch.zeros(b, t, dtype=torch.float32, device=logits.device)
    drawn = torch.zeros(b, t, dtype=torch.long, device=logits.device)
    drawn_lp = torch.zeros(b, t, dtype=torch.float32, device=logits.device)
    # Rows with equal settings are sampled in one call, in row order; with a single group this consumes the
    # generator exactly like the native engine's batched call over masked positions.
    groups: dict[RowSampling, list[int]] = {}
    for i in range(b):
        if not bool(done[i]):
            groups.setdefault(sampling[i], []).append(i)
    for sp, rows in groups.items():
        in_group = torch.zeros(b, 1, dtype=torch.bool, device=logits.device)
        in_group[rows] = True
        sel = (masked & in_group).nonzero(as_tuple=True)  # row-major, gathers only the (M, V) rows needed
        tok, c, lp = sample_tokens(logits[sel], greedy=sp.greedy, temperature=sp.temperature, top_k=sp.top_k,
                                   top_p=sp.top_p, generator=generator, with_logprobs=True)
        conf[sel], drawn[sel], drawn_lp[sel] = c.float(), tok, lp.float()
    chosen = select_unmask(conf, masked, strategy=algo_cfg.strategy, threshold=float(algo_cfg.threshold),
                           k=algo_cfg.tokens_per_step(t))
    new_tokens = torch.where(chosen, drawn, block_tokens)

    chosen_cpu, done_cpu, lp_cpu = chosen.cpu(), done.cpu().tolist(), drawn_lp.cpu()
    records: list[BlockRecord | None] = [None] * b
    for i in range(b):
        st = states[i]
        st.forwards += 1
        if done_cpu[i]:
            if not st.finished:
                st.finished = True
                records[i] = BlockRecord(step_map=tuple(st.step_map), steps=st.steps, forwards=st.forwards,
                                         logprobs=tuple(st.logprobs))
            continue
        cols = chosen_cpu[i].nonzero().flatten().tolist()
        if cols:
            st.steps += 1
            for j in cols:
                st.step_map[j] = st.steps
                st.logprobs[j] = float(lp_cpu[i, j])
    return new_tokens, done_cpu, records


# ---------------------------------------------------------------------------------------------- scheduler side
@dataclass
class RequestCounters:
    """Running per-request totals, across blocks."""

    steps: int = 0
    forwards: int = 0
    stores: int = 0


def apply_block_record(req: Any, record: BlockRecord) -> int:
    """Append a committed block's global step ids and cumulative counters to ``req.customized_info``.

    Only generated positions (local id > 0) are committed to ``req.output_ids`` by SGLang, and they are the tail
    of the block, in order; prompt-only blocks (prefill) commit nothing. Returns the number of entries appended.
    """
    local = [s for s in record.step_map if s > 0]
    if not local:
        return 0
    counters = getattr(req, _COUNTERS_ATTR, None)
    if counters is None:
        counters = RequestCounters()
        setattr(req, _COUNTERS_ATTR, counters)
    global_ids = [counters.steps + s for s in local]
    counters.steps += record.steps
    counters.forwards += record.forwards
    counters.stores += 1
    info = req.customized_info if isinstance(getattr(req, "customized_info", None), dict) else {}
    req.customized_info = info
    n = len(local)
    info.setdefault(STEP_MAP_KEY, []).extend(global_ids)
    info.setdefault(NFE_KEY, []).extend([counters.steps] * n)
    info.setdefault(STORE_KEY, []).extend([counters.stores] * n)
    if record.logprobs:
        info.setdefault(LOGPROB_KEY, []).extend(lp for s, lp in zip(record.step_map, record.logprobs) if s > 0)
    return n


def attach_step_info(batch: Any, result: Any) -> None:
    """Move the algorithm's block records from ``result.logits_output`` onto the batch's requests."""
    logits_output = getattr(result, "logits_output", None)
    info = getattr(logits_output, "customized_info", None)
    if not isinstance(info, dict) or _RECORD_KEY not in info:
        return  # another algorithm, or a round without records
    records = info.pop(_RECORD_KEY)
    if not info:
        logits_output.customized_info = None
    for idx, req in enumerate(batch.reqs):
        rec = records[idx] if idx < len(records) else None
        if rec is not None:
            apply_block_record(req, rec)


def around_process_batch_result_dllm(original, scheduler, batch, result, *args, **kwargs):
    """AROUND hook: fill the step maps before SGLang commits the block and streams it out."""
    try:
        attach_step_info(batch, result)
    except Exception:  # never break serving over bookkeeping; the client reports missing/misaligned maps
        logger.exception("lrl_dllm: could not attach step maps to this batch")
    return original(scheduler, batch, result, *args, **kwargs)


def sampling_from_info(sampling_info: Any, batch_size: int) -> list[RowSampling]:
    """Per-request `RowSampling` from SGLang's ``SamplingBatchInfo`` (greedy for all when it is missing)."""
    if sampling_info is None:
        return [RowSampling()] * batch_size
    if bool(getattr(sampling_info, "is_all_greedy", False)):
        return [RowSampling()] * batch_size
    temps = sampling_info.temperatures.reshape(-1).tolist()
    top_ks = sampling_info.top_ks.reshape(-1).tolist()
    top_ps = sampling_info.top_ps.reshape(-1).tolist()
    if not len(temps) == len(top_ks) == len(top_ps) == batch_size:
        raise ValueError(f"{ALGORITHM_NAME}: sampling_info has {len(temps)} rows, the batch {batch_size}")
    return [RowSampling.from_sglang(t, k, p) for t, k, p in zip(temps, top_ks, top_ps)]


def unsupported_request_features(req: Any) -> str | None:
    """Why SGLang should reject ``req`` (a 0.5.23 ``Req``), or None.

    The plugin samples with temperature / top-k / top-p only; SGLang's penalties, min-p, logit bias, grammars and
    custom logit processors act in its AR sampler, which the dLLM path never runs, and its ``output_token_logprobs``
    are never filled for dLLMs (the plugin reports ``meta_info.dllm_sampling_logprobs`` instead). ``sampling_seed``
    is accepted but not honoured (one seeded generator per rank).
    """
    sp = req.sampling_params
    bad = [name for name, default in (("frequency_penalty", 0.0), ("presence_penalty", 0.0),
                                      ("repetition_penalty", 1.0), ("min_new_tokens", 0), ("min_p", 0.0))
           if getattr(sp, name, default) != default]
    grammar = ("logit_bias", "json_schema", "regex", "ebnf", "structural_tag")
    bad += [name for name in grammar if getattr(sp, name, None)]
    bad += [name for name in ("return_logprob", "custom_logit_processor") if getattr(req, name, None)]
    if not bad:
        return None
    return (f"{ALGORITHM_NAME} does not support request-level {', '.join(bad)} (it samples with temperature / top_k / "
            f"top_p only; sampling log-probs come in meta_info.{LOGPROB_KEY})")


# ---------------------------------------------------------------------------------------------- SGLang glue
_ALGO_CLS: type | None = None
_REGISTERED = False


def build_algorithm_class() -> type:
    """Create (once) the ``LRLLowConfidence`` class on top of SGLang's ``LowConfidence``."""
    global _ALGO_CLS
    if _ALGO_CLS is not None:
        return _ALGO_CLS
    from sglang.srt.dllm.algorithm.low_confidence import LowConfidence

    class LRLLowConfidence(LowConfidence):
        """LowConfidence with LightningRL's sampling rule and per-token step maps (see module docstring)."""

        def __init__(self, config):
            super().__init__(config)
            self.lrl_cfg = PluginAlgoConfig.from_dict(getattr(config, "algorithm_config", None))
            self.threshold = float(self.lrl_cfg.threshold)
            self._generator: torch.Generator | None = None
            self._records: dict[int, BlockRecord] = {}

        def _gen(self, device: torch.device) -> torch.Generator:
            if self._generator is None or self._generator.device != device:
                self._generator = torch.Generator(device=device).manual_seed(int(self.lrl_cfg.seed))
            return self._generator

        @classmethod
        def validate_request(cls, req):
            """Refuse request features this algorithm would silently ignore (SGLang aborts the request with it)."""
            return unsupported_request_features(req)

        def init_step_state(self, forward_batch):
            return [BlockStepState.new(self.block_size) for _ in range(forward_batch.batch_size)]

        def step(self, forward_batch, full_logits, states):
            bsz = forward_batch.batch_size
            logits = full_logits.view(bsz, self.block_size, full_logits.shape[-1])
            tokens = forward_batch.input_ids.view(bsz, self.block_size)
            for i, st in enumerate(states):  # states may come from another algorithm after a restart
                if not isinstance(st, BlockStepState):
                    states[i] = BlockStepState.new(self.block_size)
            sampling = sampling_from_info(getattr(forward_batch, "sampling_info", None), bsz)
            new_tokens, done, records = plugin_block_step(
                logits, tokens, self.mask_id, states, sampling, self.lrl_cfg, self._gen(logits.device),
                prompt_mask=getattr(forward_batch, "dllm_prompt_mask", None),
            )
            forward_batch.input_ids.copy_(new_tokens.reshape(-1))  # in place: CUDA-graph safe, like stock
            for i, rec in enumerate(records):
                if rec is not None:
                    self._records[i] = rec
            return done

        def run(self, model_runner, forward_batch, algo_states=None):
            self._records = {}
            out = super().run(model_runner, forward_batch, algo_states)
            logits_output = out[0]
            if self._records and hasattr(logits_output, "customized_info"):
                info = dict(logits_output.customized_info or {})
                info[_RECORD_KEY] = [self._records.get(i) for i in range(forward_batch.batch_size)]
                logits_output.customized_info = info
            self._records = {}
            return out

    LRLLowConfidence.__name__ = LRLLowConfidence.__qualname__ = ALGORITHM_NAME
    _ALGO_CLS = LRLLowConfidence
    return _ALGO_CLS


def register() -> None:
    """Entry point ``lrl_dllm`` (group ``sglang.srt.plugins``): register the algorithm and the scheduler hook."""
    try:
        from sglang.srt.dllm import algorithm as algo_pkg
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as exc:
        raise ImportError(
            "lrl.rollout.sglang_plugin.register() needs SGLang (0.5.23) in this environment; it is called by SGLang's "
            "plugin loader inside the SGLang server, not by the trainer"
        ) from exc
    global _REGISTERED
    algo_pkg.algo_name_to_cls[ALGORITHM_NAME] = build_algorithm_class()
    if _REGISTERED:  # the hook must wrap once, or every block would be appended twice
        return
    _REGISTERED = True
    HookRegistry.register(HOOK_TARGET, around_process_batch_result_dllm, HookType.AROUND)
    logger.info("lrl_dllm: registered dLLM algorithm %s and the step-map hook", ALGORITHM_NAME)
