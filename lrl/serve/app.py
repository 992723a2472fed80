"""``lrl serve``: an HTTP server over `NativeEngine` that speaks the subset of SGLang's API LightningRL uses.

It lets the SGLang rollout client, the weight-sync protocols and multi-server setups run (and be tested) without
SGLang or a GPU, and serves models SGLang 0.5.23 cannot (Fast-dLLM-v2, any checkpoint `lrl.models` loads).

Endpoints (JSON; errors are ``{"success": false, "message", "error": {...}}`` with a 4xx status for bad requests;
bodies over ``max_request_bytes`` get 413; every sampling field is type- and range-checked (finite floats,
integer ids and seeds, a non-negative seed); a request without ``sampling_seed`` samples with a fresh random seed,
as SGLang does):

* ``GET|POST /health``, ``/health_generate`` (runs a one-token generation), ``/get_model_info`` (alias
  ``/model_info``; includes ``weight_version`` and ``lrl_decode``, the server's decoding flags),
  ``/get_server_info``, ``/get_weight_version``;
* ``POST /generate``: ``text`` or ``input_ids`` (single or batch), ``sampling_params`` (dict or list); returns
  ``{"text", "output_ids", "meta_info": {"id", "finish_reason": {"type"}, "prompt_tokens", "completion_tokens",
  "weight_version", "dllm_step_map", "dllm_nfe", "dllm_store_passes", "dllm_sampling_logprobs", "dllm_tail_ids",
  "dllm_tail_step_map", "dllm_planner_logprobs", ...}}`` (a list for batches). Block size,
  strategy and threshold are server flags (like SGLang's ``--dllm-algorithm-config``); temperature / top-k / top-p
  / max_new_tokens / stop ids come per request, with SGLang's semantics (temperature 0 = greedy; the model's eos
  stops unless ``ignore_eos``). dUltra: with a planner head in the checkpoint, ``custom_params``
  ``{"lrl_remasking_strategy": "planner", "lrl_planner_threshold": t}`` (or ``--strategy planner``) decodes with
  the head, and ``dllm_planner_logprobs`` holds each step's decision log-prob (null for other strategies); without
  a head such a request gets a 400;
* weight sync: ``/update_weights_from_disk`` (the directory must hold every parameter, with the model's shapes,
  floating-point and finite; anything else is refused with a 400 naming what is wrong and the weights stay as they
  were; the swap happens under the engine lock, between requests); ``/begin_weight_update`` …
  ``/end_weight_update`` (required around distributed updates, as in SGLang 0.5.23);
  ``/init_weights_update_group`` + ``/update_weights_from_distributed`` (this server joins the group as rank
  ``rank_offset`` and receives rank 0's broadcasts in a worker thread);
  ``/destroy_weights_update_group``; ``/update_weight_version``;
* ``/flush_cache``, ``/release_memory_occupation``, ``/resume_memory_occupation``, ``/pause_generation``,
  ``/continue_generation``: acknowledged no-ops (there is no prefix cache or memory saver here).

All model work is serialized by one engine lock and runs in worker threads, so health checks stay responsive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from lrl.rollout.engine import NativeEngine
from lrl.rollout.types import SamplingParams
from lrl.serve.cancel import CancelHook, GenerationCancelled, run_cancellable
from lrl.serve.limits import BodySizeLimit, json_error

logger = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400)."""


# ---------------------------------------------------------------------------------------------- request models
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SGLangSamplingParams(BaseModel):
    """The SGLang ``sampling_params`` keys ``lrl serve`` understands; unknown keys are rejected (typos)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: StrictInt = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=1e4, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: StrictInt = -1
    min_p: float = Field(0.0, ge=0.0, le=0.0, description="min-p sampling is not supported")
    stop_token_ids: list[StrictInt] | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: StrictInt | None = Field(None, ge=0, lt=2**63, description="none: a fresh random seed")
    n: int = Field(1, ge=1, le=1, description="send one row per sample")
    min_new_tokens: int = Field(0, ge=0, le=0, description="min_new_tokens is not supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    repetition_penalty: float = Field(1.0, ge=1.0, le=1.0)
    custom_params: dict[str, Any] | None = None


class GenerateRequest(_Model):
    text: str | list[str] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None  # strict: true / 1.0 are not token ids
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False


class UpdateFromDiskRequest(_Model):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class InitGroupRequest(_Model):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class DistributedUpdateRequest(_Model):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class GroupNameRequest(_Model):
    group_name: str = "weight_update_group"


class WeightVersionRequest(_Model):
    new_version: str
    abort_all_requests: bool = True


# ---------------------------------------------------------------------------------------------- state
@dataclasses.dataclass
class DecodeConfig:
    """Server-side decoding flags (SGLang's algorithm config)."""

    block_size: int
    remasking_strategy: str = "low_confidence_dynamic"
    threshold: float = 0.9
    denoising_steps: int = 32
    eos_policy: str = "truncate"
    planner_threshold: float = 0.5

    def __post_init__(self) -> None:
        SamplingParams(block_size=self.block_size, remasking_strategy=self.remasking_strategy,
                       threshold=self.threshold, denoising_steps=self.denoising_steps, eos_policy=self.eos_policy,
                       planner_threshold=self.planner_threshold)


class ServeState:
    """Everything the endpoints share: the engine, its lock, the weight version and the update groups."""

    def __init__(self, engine: NativeEngine, decode: DecodeConfig, *, model_path: str, weight_version: str):
        self.engine = engine
        self.decode = decode
        self.model_path = model_path
        self.weight_version = weight_version
        self.lock = threading.Lock()
        self.cancel = CancelHook(engine.lm)  # a client that went away stops its generation at the next forward
        self.bracket_open = False
        self.groups: dict[str, Any] = {}
        from lrl.models.generation import checkpoint_stop_ids

        # generation_config.json's eos ids (SDAR: <|im_end|> and <|endoftext|>) plus the tokenizer's eos
        self.eos_ids = checkpoint_stop_ids(model_path, engine.tokenizer, hf_config=engine.lm.hf_config)
        self.vocab_size = int(engine.lm.model.get_output_embeddings().weight.shape[0])
        self.has_planner = getattr(engine.lm, "planner", None) is not None
        if decode.remasking_strategy == "planner" and not self.has_planner:
            raise ValueError(f"--strategy planner needs a checkpoint with a planner head; {model_path or 'the model'} "
                             "has none (dUltra imitation writes one: scripts/dultra_imitation.py)")

    def model_info(self) -> dict:
        cfg = self.engine.lm.hf_config
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "weight_version": self.weight_version,
            "model_type": self.engine.lm.identity.get("model_type", getattr(cfg, "model_type", None)),
            "architectures": self.engine.lm.identity.get("architectures", getattr(cfg, "architectures", None)),
            "lrl_engine": "native",
            "lrl_planner_head": self.has_planner,
            "lrl_decode": dataclasses.asdict(self.decode) | {"max_rows": self.engine.max_rows},
        }


def _ok(message: str = "Success", **extra) -> dict:
    return {"success": True, "message": message, **extra}


# ---------------------------------------------------------------------------------------------- generation
def _rows(req: GenerateRequest, state: ServeState) -> tuple[list[list[int]], bool]:
    """Prompt token ids of each row, and whether the request was a batch."""
    if (req.text is None) == (req.input_ids is None):
        raise BadRequest("exactly one of 'text' and 'input_ids' must be given")
    if req.stream:
        raise BadRequest("stream=true is not supported by lrl serve")
    if req.text is not None:
        batch = isinstance(req.text, list)
        texts = req.text if batch else [req.text]
        rows = [state.engine.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    else:
        ids = req.input_ids
        batch = bool(ids) and isinstance(ids[0], list)
        rows = [list(r) for r in ids] if batch else [list(ids)]
    if not rows:
        raise BadRequest("empty batch")
    for i, r in enumerate(rows):
        if not r:
            raise BadRequest(f"prompt {i} is empty")
        bad = [t for t in r if not 0 <= t < state.vocab_size]
        if bad:
            raise BadRequest(f"prompt {i} has token ids outside [0, {state.vocab_size}): {bad[:5]}")
    return rows, batch


def _sampling(raw: dict | None, state: ServeState) -> tuple[SamplingParams, SGLangSamplingParams]:
    try:
        p = SGLangSamplingParams(**(raw or {}))
    except Exception as exc:  # pydantic ValidationError → 400 with the field names
        raise BadRequest(f"invalid sampling_params: {exc}") from exc
    if p.stop:
        raise BadRequest("stop strings are not supported by lrl serve; use stop_token_ids")
    if p.top_k == 0 or p.top_k < -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {p.top_k}")
    greedy = p.temperature == 0.0 or p.top_k == 1
    stop = () if p.ignore_eos else tuple(sorted(set(p.stop_token_ids or ()) | set(state.eos_ids)))
    custom = p.custom_params or {}
    eos_policy = custom.get("lrl_eos_policy", state.decode.eos_policy)
    d = state.decode
    # dUltra: a request may ask for the planner strategy (custom_params) when the served checkpoint has a head
    strategy = custom.get("lrl_remasking_strategy", d.remasking_strategy)
    plan_t = custom.get("lrl_planner_threshold", d.planner_threshold)
    if not isinstance(strategy, str) or isinstance(plan_t, bool) or not isinstance(plan_t, (int, float)):
        raise BadRequest("custom_params.lrl_remasking_strategy must be a string and lrl_planner_threshold a number")
    if strategy == "planner" and not state.has_planner:
        raise BadRequest("remasking_strategy 'planner' needs a checkpoint with a planner head; the served model "
                         "has none")
    try:
        sp = SamplingParams(
            block_size=d.block_size, remasking_strategy=strategy, threshold=d.threshold,
            planner_threshold=float(plan_t),
            denoising_steps=d.denoising_steps, temperature=1.0 if greedy else p.temperature,
            top_k=0 if greedy or p.top_k == -1 else p.top_k, top_p=1.0 if greedy else p.top_p, greedy=greedy,
            max_new_tokens=p.max_new_tokens, stop_token_ids=stop, samples_per_prompt=1,
            seed=secrets.randbelow(2**63) if p.sampling_seed is None else p.sampling_seed,  # as SGLang: random
            eos_policy=eos_policy,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    return sp, p


def run_generate(state: ServeState, req: GenerateRequest, cancel: threading.Event | None = None) -> Any:
    """Serve one /generate request (blocking; called in a worker thread). Setting ``cancel`` (the client went
    away) stops it at the engine's next forward with `GenerationCancelled`."""
    rows, batch = _rows(req, state)
    raw = req.sampling_params
    if isinstance(raw, list):
        if len(raw) != len(rows):
            raise BadRequest(f"sampling_params has {len(raw)} entries for {len(rows)} prompts")
        params = [_sampling(r, state) for r in raw]
    else:
        params = [_sampling(raw, state)] * len(rows)
    rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(rows)
    if len(rids) != len(rows):
        raise BadRequest(f"rid has {len(rids)} entries for {len(rows)} prompts")
    # Rows with equal sampling settings decode together, in request order (same batching as the native engine).
    groups: dict[tuple, list[int]] = {}
    for i, (sp, _) in enumerate(params):
        groups.setdefault(dataclasses.astuple(sp), []).append(i)
    outputs: list[dict | None] = [None] * len(rows)
    t0 = time.perf_counter()
    with state.lock, state.cancel.watching(cancel):
        version = state.weight_version
        for idx in groups.values():
            sp, sgl = params[idx[0]]
            try:
                res = state.engine.generate([rows[i] for i in idx], sp)
            except ValueError as exc:  # e.g. prompt + max_new_tokens beyond the context
                raise BadRequest(str(exc)) from exc
            for j, i in enumerate(idx):
                ids = res.response_ids[j]
                if res.finish_reasons[j] == "stop":
                    fr = {"type": "stop", "matched": ids[-1] if ids and sp.eos_policy == "truncate" else None}
                else:
                    fr = {"type": "length", "length": len(ids)}
                outputs[i] = {
                    "text": state.engine.tokenizer.decode(ids, skip_special_tokens=sgl.skip_special_tokens),
                    "output_ids": ids,
                    "meta_info": {
                        "id": rids[i] or uuid.uuid4().hex,
                        "finish_reason": fr,
                        "prompt_tokens": len(rows[i]),
                        "completion_tokens": len(ids),
                        "cached_tokens": 0,
                        "weight_version": version,
                        "dllm_step_map": res.step_maps[j],
                        "dllm_nfe": int(res.num_forwards[j]),
                        "dllm_store_passes": int(res.num_store_passes[j]),
                        # training records: sampling log-probs (as the lrl_dllm SGLang plugin reports them) and
                        # the final block's positions after a mid-block stop, for an exact replay
                        "dllm_sampling_logprobs": res.sampling_logprobs[j],
                        "dllm_tail_ids": res.tail_ids[j],
                        "dllm_tail_step_map": res.tail_step_maps[j],
                        # planner strategy: log-prob of each step's unmasking decisions (RolloutBatch's record)
                        "dllm_planner_logprobs": (None if res.planner_logprobs is None
                                                  else res.planner_logprobs[j]),
                        "e2e_latency": time.perf_counter() - t0,
                    },
                }
    return outputs if batch else outputs[0]


# ---------------------------------------------------------------------------------------------- weights
def _check_fit(state: ServeState, named: list[tuple[str, torch.Tensor]], *, complete: bool = False) -> None:
    """Refuse the whole update before touching the model, so a bad request never leaves half-loaded weights:
    every name known, shapes equal, floating-point values for floating-point parameters (cast on load, as SGLang
    does), all finite, and with ``complete`` every parameter of the model present (a tied one under any name)."""
    model = state.engine.lm.model
    own = {n: t for n, t in model.named_parameters()} | {n: t for n, t in model.named_buffers()}
    if state.has_planner:  # the planner head's tensors travel as planner.* (NativeEngine.update_weights)
        own |= {f"planner.{n}": t for n, t in state.engine.lm.planner.state_dict(keep_vars=True).items()}
    unknown, wrong, bad_dtype, nonfinite, given = [], [], [], [], set()
    for name, tensor in named:
        key = name.removeprefix("model.") if name not in own and name.startswith("model.model.") else name
        if key not in own:
            unknown.append(name)
            continue
        given.add(key)
        if tuple(own[key].shape) != tuple(tensor.shape):
            wrong.append(f"{name}: got {tuple(tensor.shape)}, model has {tuple(own[key].shape)}")
        elif own[key].is_floating_point() and not tensor.is_floating_point():
            bad_dtype.append(f"{name}: {tensor.dtype} for a {own[key].dtype} parameter")
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nonfinite.append(name)
    problems = [
        (unknown, "unknown parameter names"), (wrong, "shape mismatch"), (bad_dtype, "wrong dtype"),
        (nonfinite, "non-finite values (NaN/inf) in"),
    ]
    if complete:
        aliases: dict[int, list[str]] = {}
        for n, t in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(t), []).append(n)
        missing = [names[0] for names in aliases.values() if not given.intersection(names)]
        problems.append((missing, f"incomplete: {len(missing)} of {len(aliases)} parameters missing, e.g."))
    for items, what in problems:
        if items:
            raise BadRequest(f"{what} {items[:5]}{' …' if len(items) > 5 else ''}; the served weights are unchanged")


def _load_named(state: ServeState, named: list[tuple[str, torch.Tensor]], version: str | None,
                complete: bool = False) -> None:
    _check_fit(state, named, complete=complete)
    with state.lock:
        try:
            state.engine.update_weights(named)
        except KeyError as exc:
            raise BadRequest(str(exc.args[0]) if exc.args else str(exc)) from exc
        except RuntimeError as exc:  # shape mismatch in copy_
            raise BadRequest(f"weights do not fit the served model: {exc}") from exc
        if version is not None:
            state.weight_version = version


def run_update_from_disk(state: ServeState, req: UpdateFromDiskRequest) -> None:
    from lrl.rollout.weight_sync import read_hf_weights

    if req.load_format not in (None, "auto", "safetensors"):
        raise BadRequest(f"load_format {req.load_format!r} is not supported (safetensors only)")
    try:
        weights = read_hf_weights(req.model_path)
    except Exception as exc:  # missing, truncated or foreign files are the request's fault: 400, never 500
        raise BadRequest(f"cannot load weights from {req.model_path!r}: {type(exc).__name__}: {exc}") from exc
    if state.has_planner:  # a head saved beside the weights (save_checkpoint) is loaded too
        weights |= _read_planner(req.model_path)
    # a disk update replaces the whole model (SGLang reloads it): a partial directory would mix old and new weights
    _load_named(state, list(weights.items()), req.weight_version, complete=True)


def _read_planner(path: str) -> dict[str, torch.Tensor]:
    """``planner.*`` tensors of the planner head file in ``path`` (empty when it has none)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from lrl.models.planner import PLANNER_FILE

    file = Path(path) / PLANNER_FILE
    if not file.is_file():
        return {}
    try:
        return {f"planner.{k}": v for k, v in load_file(str(file)).items()}
    except Exception as exc:
        raise BadRequest(f"cannot load {file}: {type(exc).__name__}: {exc}") from exc


def run_init_group(state: ServeState, req: InitGroupRequest, timeout_s: float) -> None:
    from lrl.rollout.weight_sync import init_custom_process_group

    if req.group_name in state.groups:
        raise BadRequest(f"weight-update group {req.group_name!r} already exists; destroy it first")
    if req.backend not in ("gloo", "nccl"):
        raise BadRequest(f"backend must be 'gloo' or 'nccl', got {req.backend!r}")
    if req.backend == "nccl" and state.engine.lm.device.type != "cuda":
        raise BadRequest("backend 'nccl' needs the served model on a CUDA device; use backend='gloo'")
    if req.rank_offset >= req.world_size:
        raise BadRequest(f"rank_offset {req.rank_offset} must be < world_size {req.world_size}")
    try:
        pg = init_custom_process_group(backend=req.backend, init_method=f"tcp://{req.master_address}:{req.master_port}",
                                       world_size=req.world_size, rank=req.rank_offset, group_name=req.group_name,
                                       timeout_s=timeout_s)
    except Exception as exc:
        raise BadRequest(f"failed to join weight-update group {req.group_name!r}: {exc}") from exc
    state.groups[req.group_name] = (pg, req.backend)


def run_update_distributed(state: ServeState, req: DistributedUpdateRequest) -> None:
    if not state.bracket_open:
        raise BadRequest("update_weights_from_distributed must run between begin_weight_update() and "
                         "end_weight_update()")
    if req.group_name not in state.groups:
        raise BadRequest(f"group {req.group_name!r} not in {sorted(state.groups)}; call init_weights_update_group "
                         "first")
    if not len(req.names) == len(req.dtypes) == len(req.shapes):
        raise BadRequest(f"names/dtypes/shapes lengths differ: {len(req.names)}, {len(req.dtypes)}, "
                         f"{len(req.shapes)}")
    if req.load_format is not None:
        raise BadRequest(f"load_format {req.load_format!r} is not supported (per-tensor broadcasts only)")
    pg, backend = state.groups[req.group_name]
    device = state.engine.lm.device if backend == "nccl" else torch.device("cpu")
    tensors = []
    for name, dt, shape in zip(req.names, req.dtypes, req.shapes):
        dtype = getattr(torch, dt, None)
        if not isinstance(dtype, torch.dtype):
            raise BadRequest(f"unknown dtype {dt!r} for {name!r}")
        tensors.append(torch.empty(shape, dtype=dtype, device=device))
    works = [torch.distributed.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]
    for w in works:
        w.wait()
    _load_named(state, list(zip(req.names, tensors)), req.weight_version)


# ---------------------------------------------------------------------------------------------- app
def create_app(engine: NativeEngine, decode: DecodeConfig, *, model_path: str = "", weight_version: str = "default",
               group_timeout_s: float = 600.0, max_request_bytes: int = 16 << 20) -> FastAPI:
    """The FastAPI application serving ``engine`` (see the module docstring for the endpoints); request bodies
    over ``max_request_bytes`` get HTTP 413."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    state = ServeState(engine, decode, model_path=model_path, weight_version=weight_version)
    app = FastAPI(title="lrl serve", version="0.1")
    app.state.lrl = state
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return json_error(400, f"invalid request: {errs}")

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return json_error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return json_error(exc.status_code, str(exc.detail), "HTTPException")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")

    @app.api_route("/health", methods=["GET", "POST"])
    async def health():
        return {"status": "ok"}

    @app.api_route("/health_generate", methods=["GET", "POST"])
    async def health_generate():
        req = GenerateRequest(input_ids=[state.eos_ids[0] if state.eos_ids else 0],
                              sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        await asyncio.to_thread(run_generate, state, req)
        return {"status": "ok"}

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info():
        return state.model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info():
        return {"tp_size": 1, "dp_size": 1, "model_path": state.model_path, "weight_version": state.weight_version,
                "device": str(state.engine.lm.device), **dataclasses.asdict(state.decode),
                "max_running_requests": state.engine.max_rows, "lrl_cancelled_generations": state.cancel.cancelled}

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": state.weight_version}

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        try:
            return await run_cancellable(request, run_generate, state, req)
        except GenerationCancelled:
            logger.info("/generate: the client went away; its generation was stopped")
            return json_error(499, "client closed the request; generation cancelled")

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(req: UpdateFromDiskRequest):
        await asyncio.to_thread(run_update_from_disk, state, req)
        return _ok("Succeeded to update model weights.", num_paused_requests=0)

    @app.post("/begin_weight_update")
    async def begin_weight_update(body: dict | None = None):
        if state.bracket_open:
            raise BadRequest("a weight-update session is already open; call end_weight_update() first")
        state.bracket_open = True
        return _ok()

    @app.post("/end_weight_update")
    async def end_weight_update(body: dict | None = None):
        if not state.bracket_open:
            raise BadRequest("no weight-update session is open; call begin_weight_update() first")
        state.bracket_open = False
        return _ok()

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(req: InitGroupRequest):
        await asyncio.to_thread(run_init_group, state, req, group_timeout_s)
        return _ok("Succeeded to initialize custom process group.")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(req: DistributedUpdateRequest):
        await asyncio.to_thread(run_update_distributed, state, req)
        return _ok("Succeeded to update parameter online.")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(req: GroupNameRequest):
        from lrl.rollout.weight_sync import destroy_process_group

        entry = state.groups.pop(req.group_name, None)
        if entry is None:
            raise BadRequest("The group to be destroyed does not exist.")
        await asyncio.to_thread(destroy_process_group, entry[0])
        return _ok("Succeeded to destroy custom process group.")

    @app.post("/update_weight_version")
    async def update_weight_version(req: WeightVersionRequest):
        with state.lock:
            state.weight_version = req.new_version
        return _ok(f"Weight version updated to {req.new_version}", new_version=req.new_version)

    for path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation", "/pause_generation",
                 "/continue_generation"):
        app.add_api_route(path, _make_noop(path), methods=["GET", "POST"])
    return app


def _make_noop(path: str):
    async def noop():
        return _ok(f"{path.lstrip('/')}: nothing to do in lrl serve")

    noop.__name__ = path.strip("/").replace("/", "_")
    return noop
