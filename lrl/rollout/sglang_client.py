"""`SGLangRolloutGenerator`: rollouts from SGLang servers (or ``lrl serve``) over HTTP, plus weight sync.

The servers run in their own environment (SGLang pins its own torch/transformers; see docs/sglang.md); the trainer
only speaks JSON over HTTP with ``httpx``. Generation sends ``input_ids`` with SGLang ``sampling_params`` and reads
``output_ids`` and ``meta_info`` (``finish_reason``, ``weight_version`` and, from the ``lrl_dllm`` plugin or
``lrl serve``, ``dllm_step_map`` / ``dllm_nfe`` / ``dllm_store_passes`` / ``dllm_sampling_logprobs``; from
``lrl serve`` only, the final-block tail ``dllm_tail_ids`` / ``dllm_tail_step_map`` and, for dUltra's ``planner``
strategy (``lrl serve`` with a planner head only; sent as ``custom_params``), ``dllm_planner_logprobs``) into the
same `RolloutBatch` the native engine builds. A batch carries sampling log-probs only when every answer had them.
The decoding rule itself (block size, strategy, threshold) is fixed by the server (``--dllm-algorithm-config`` or
``lrl serve`` flags); against ``lrl serve`` the client checks it matches `SamplingParams`.

Robustness: every call has a timeout; connection failures are retried ``max_retries`` times with exponential
backoff; a dead server, an HTTP error or a malformed answer raises `RolloutServerError` naming the URL; an answer
produced by other weights than the last synced version raises `StaleWeightsError`.

The server calls (HTTP with retries, readiness, weight sync, memory/cache control) and the errors live in
`lrl.rollout.sglang_servers`; the errors are re-exported here.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Sequence
from typing import Any, Literal

import httpx
import torch

from lrl.rollout import weight_sync as ws
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.sglang_servers import MEMORY_TAGS, RolloutServerError, SGLangServerMixin, StaleWeightsError
from lrl.rollout.types import RolloutBatch, SamplingParams

STEP_MAP_KEY, NFE_KEY, STORE_KEY = "dllm_step_map", "dllm_nfe", "dllm_store_passes"
LOGPROB_KEY, TAIL_IDS_KEY, TAIL_STEPS_KEY = "dllm_sampling_logprobs", "dllm_tail_ids", "dllm_tail_step_map"
PLANNER_KEY = "dllm_planner_logprobs"


def _last_int(value: Any) -> int:
    """Request-level counter from ``meta_info``: an int (``lrl serve``) or a per-token cumulative list (plugin)."""
    if value is None:
        return 0
    if isinstance(value, list):
        vals = [v for v in value if v is not None]
        return int(vals[-1]) if vals else 0
    return int(value)


class SGLangRolloutGenerator(SGLangServerMixin, RolloutGenerator):
    """Rollout generator over one or more SGLang-compatible HTTP servers.

    Args:
        urls: server base URLs (``http://host:port``); rows are spread round-robin over them. With
            ``router=True``, a single router/gateway URL that load-balances by itself.
        tokenizer_path: checkpoint (or tokenizer) directory: encodes string prompts, decodes responses.
        timeout_s: read timeout of one ``/generate`` call (a chunk of ``max_rows_per_request`` rows).
        connect_timeout_s: TCP connect timeout of every call.
        max_retries: extra attempts after a connection failure (or HTTP 502/503/504), with exponential backoff.
        backoff_s: first backoff; doubles per attempt, capped at 30 s.
        health_timeout_s: how long the first use waits for every server's ``/health``.
        router: ``urls`` is one router URL; health checks and weight updates go to ``worker_urls`` if given.
        worker_urls: the servers behind the router (for weight sync); default: ``urls``.
        max_rows_per_request: rows (prompt × sample) per ``/generate`` batch request.
        max_concurrency: concurrent HTTP requests (default 4 per server).
        weight_sync: ``"disk"`` (HF checkpoint in ``sync_dir`` + ``/update_weights_from_disk``) or
            ``"distributed"`` (rank-0 broadcast over a process group + ``/update_weights_from_distributed``).
        sync_dir: directory the servers can read for disk sync (default: a temp dir, only valid when the servers
            share this machine's filesystem; /dev/shm is a good choice on one node).
        template_dir: checkpoint whose config/tokenizer files accompany synced weights (default ``tokenizer_path``).
        keep_checkpoints: synced versions kept in ``sync_dir``.
        sync_dtype: cast floating weights to this dtype before syncing (e.g. ``"bfloat16"``); None keeps them.
        bracket_disk_updates: wrap disk updates in ``/begin_weight_update`` … ``/end_weight_update`` (not needed
            on SGLang 0.5.23, where ``end`` would re-run post-load processing; off by default).
        master_address / master_port: rendezvous of the distributed group (rank 0 = this process; port
            default: a free one).
        dist_backend: ``"nccl"`` (GPU trainer and servers) or ``"gloo"`` (CPU, tests, ``lrl serve``).
        group_name: name of the weight-update group.
        bucket_bytes: bytes per ``/update_weights_from_distributed`` call.
        sync_timeout_s: timeout of weight-update calls and of the distributed group.
        flush_cache: flush the servers' prefix cache after an update (stale dLLM blocks must not survive).
        initial_weight_version: ``weight_version`` before the first sync.
        expected_server_version: if set, the version string servers must report before the first sync.
        require_step_maps: raise if a server returns no ``dllm_step_map`` (SGLang launched without the plugin).
        server_tp_sizes: tensor-parallel size of each worker (distributed ranks); default: read ``tp_size`` from
            ``/get_server_info`` (1 if absent).
        api_key: sent as ``Authorization: Bearer`` when the servers were launched with ``--api-key``.
        release_tags: what `release_memory` frees on the servers before a training phase: ``["kv_cache",
            "weights"]`` for servers colocated with training on the same GPUs (launched with
            ``--enable-memory-saver``); empty (default): servers keep their memory and the hooks do nothing.
    """

    shared_across_ranks = True  # every rank's rollouts go to the same servers: rank 0 pushes the weights

    def __init__(
        self,
        urls: list[str] | str,
        tokenizer_path: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 2,
        backoff_s: float = 1.0,
        health_timeout_s: float = 600.0,
        router: bool = False,
        worker_urls: list[str] | None = None,
        max_rows_per_request: int = 64,
        max_concurrency: int | None = None,
        weight_sync: Literal["disk", "distributed"] = "disk",
        sync_dir: str | None = None,
        template_dir: str | None = None,
        keep_checkpoints: int = 2,
        sync_dtype: str | None = None,
        bracket_disk_updates: bool = False,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        dist_backend: Literal["nccl", "gloo"] = "nccl",
        group_name: str = "lrl_weight_sync",
        bucket_bytes: int = 512 << 20,
        sync_timeout_s: float = 600.0,
        flush_cache: bool = True,
        initial_weight_version: int = 0,
        expected_server_version: str | None = None,
        require_step_maps: bool = True,
        server_tp_sizes: list[int] | None = None,
        api_key: str | None = None,
        release_tags: Sequence[str] = (),
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("SGLangRolloutGenerator needs at least one server URL")
        if router and len(urls) != 1:
            raise ValueError(f"router=True takes exactly one router URL, got {len(urls)}")
        if weight_sync not in ("disk", "distributed"):
            raise ValueError(f"weight_sync must be 'disk' or 'distributed', got {weight_sync!r}")
        if dist_backend not in ("nccl", "gloo"):
            raise ValueError(f"dist_backend must be 'nccl' or 'gloo', got {dist_backend!r}")
        for name, val in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                          ("health_timeout_s", health_timeout_s), ("sync_timeout_s", sync_timeout_s)):
            if not val > 0:
                raise ValueError(f"{name} must be > 0, got {val}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(f"max_retries and backoff_s must be >= 0, got {max_retries}, {backoff_s}")
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request must be >= 1, got {max_rows_per_request}")
        bad_tags = sorted(set(release_tags) - set(MEMORY_TAGS))
        if bad_tags:
            raise ValueError(f"data.init_args.rollout.sglang.release_tags: unknown tags {bad_tags}; SGLang 0.5.23 "
                             f"knows {list(MEMORY_TAGS)}")
        self.release_tags = [t for t in MEMORY_TAGS if t in set(release_tags)]
        self._released: set[str] = set()
        self.urls = [u.rstrip("/") for u in urls]
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or urls)]
        self.router = router
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.max_retries, self.backoff_s = int(max_retries), float(backoff_s)
        self.health_timeout_s = float(health_timeout_s)
        self.max_rows_per_request = int(max_rows_per_request)
        self.weight_sync = weight_sync
        self.template_dir = str(template_dir or tokenizer_path)
        self.sync_dtype = getattr(torch, sync_dtype) if isinstance(sync_dtype, str) else sync_dtype
        self.bracket_disk_updates = bracket_disk_updates
        self.master_address, self.master_port = master_address, master_port
        self.dist_backend, self.group_name = dist_backend, group_name
        self.bucket_bytes, self.sync_timeout_s = int(bucket_bytes), float(sync_timeout_s)
        self.flush_cache_after_update = flush_cache
        self.require_step_maps = require_step_maps
        self.server_tp_sizes = server_tp_sizes
        self.weight_version = int(initial_weight_version)
        self._expected_version: str | None = expected_server_version
        self._sync_dir = sync_dir
        self._keep = keep_checkpoints
        self._store: ws.DiskCheckpointStore | None = None

        from lrl.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        n_conn = max_concurrency or 4 * len(set(self.urls) | set(self.worker_urls))
        self._http = httpx.Client(
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s), headers=headers,
            limits=httpx.Limits(max_connections=n_conn + 4, max_keepalive_connections=n_conn + 4),
        )
        self._pool = cf.ThreadPoolExecutor(max_workers=n_conn, thread_name_prefix="lrl-rollout-http")
        self._rr = 0
        self._ready = False
        self._server_info: dict[str, dict] = {}
        self._pg = None
        self._lock = threading.Lock()

    def _check_decode_config(self, sp: SamplingParams) -> None:
        """Against ``lrl serve`` (which reports its decoding flags) refuse SamplingParams it would not honour."""
        for u in self.urls:
            info = self._server_info.get(u, {})
            dec = info.get("lrl_decode")
            if sp.eos_policy != "truncate" and not dec:
                raise ValueError(f"eos_policy={sp.eos_policy!r} needs lrl serve; {u} (SGLang) always truncates at "
                                 "the stop token")
            planner = sp.remasking_strategy == "planner"
            if planner and not dec:
                raise ValueError(f"remasking_strategy 'planner' needs lrl serve or the native engine: the SGLang "
                                 f"plugin does not support it ({u})")
            if planner and not info.get("lrl_planner_head"):
                raise ValueError(f"remasking_strategy 'planner' needs a planner head, but the checkpoint served by {u} "
                                 "has none")
            if not dec:
                continue
            checks = [("block_size", sp.block_size)]
            if not planner:  # the planner strategy and its threshold travel per request (custom_params)
                checks.append(("remasking_strategy", sp.remasking_strategy))
                if sp.remasking_strategy == "low_confidence_dynamic":
                    checks.append(("threshold", sp.threshold))
                else:
                    checks.append(("denoising_steps", sp.denoising_steps))
            for key, want in checks:
                have = dec.get(key)
                if have != want and not (isinstance(want, float) and have is not None and abs(have - want) < 1e-9):
                    raise ValueError(f"SamplingParams.{key}={want!r} but the server {u} decodes with {key}={have!r} "
                                     "(server-side flag); restart the server or change the config")

    # ------------------------------------------------------------------ generation
    def _encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer(p, add_special_tokens=False).input_ids
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            out.append(ids)
        return out

    @staticmethod
    def sglang_sampling_params(sp: SamplingParams, seed: int) -> dict:
        """SamplingParams → SGLang ``sampling_params`` (temperature 0 = greedy; no stop ids ⇒ ``ignore_eos``)."""
        out = {
            "max_new_tokens": sp.max_new_tokens,
            "temperature": 0.0 if sp.greedy else sp.temperature,
            "top_p": 1.0 if sp.greedy else sp.top_p,
            "top_k": -1 if sp.greedy or sp.top_k <= 0 else sp.top_k,
            # SGLang also stops on the model's eos when stop ids are given; ignore_eos disables every stop id
            "stop_token_ids": list(sp.stop_token_ids),
            "ignore_eos": not sp.stop_token_ids,
            "skip_special_tokens": True,
            "sampling_seed": int(seed) % (2**63),
        }
        custom = {}
        if sp.eos_policy != "truncate":
            custom["lrl_eos_policy"] = sp.eos_policy
        if sp.remasking_strategy == "planner":  # lrl serve only (checked against the server's info)
            custom |= {"lrl_remasking_strategy": "planner", "lrl_planner_threshold": sp.planner_threshold}
        if custom:
            out["custom_params"] = custom
        return out

    def _parse_item(self, url: str, item: Any) -> tuple:
        """One answer → (ids, step map, finish reason, forwards, store passes, sampling log-probs or None,
        tail ids, tail step ids, planner decision log-probs or None)."""
        ids, sm, kind, nfe, stores = self._parse_core(url, item)
        meta = item["meta_info"]
        lp = meta.get(LOGPROB_KEY)
        if lp is not None and (not isinstance(lp, list) or len(lp) != len(ids)
                               or not all(isinstance(x, (int, float)) for x in lp)):
            raise RolloutServerError(f"{url}: {LOGPROB_KEY} has {len(lp) if isinstance(lp, list) else lp!r} "
                                     f"entries for {len(ids)} output ids")
        tail, tail_sm = meta.get(TAIL_IDS_KEY) or [], meta.get(TAIL_STEPS_KEY) or []
        if (not isinstance(tail, list) or not isinstance(tail_sm, list) or len(tail) != len(tail_sm)
                or not all(isinstance(t, int) for t in tail + tail_sm)):
            raise RolloutServerError(f"{url}: {TAIL_IDS_KEY} / {TAIL_STEPS_KEY} are malformed or of different "
                                     "lengths")
        plan = meta.get(PLANNER_KEY)
        n_steps = max(sm + tail_sm, default=0)
        if plan is not None and (not isinstance(plan, list) or len(plan) != n_steps
                                 or not all(isinstance(x, (int, float)) for x in plan)):
            raise RolloutServerError(f"{url}: {PLANNER_KEY} has {len(plan) if isinstance(plan, list) else plan!r} "
                                     f"entries for {n_steps} steps")
        return (ids, sm, kind, nfe, stores, (None if lp is None else [float(x) for x in lp]), tail, tail_sm,
                None if plan is None else [float(x) for x in plan])

    def _parse_core(self, url: str, item: Any) -> tuple[list[int], list[int], str, int, int]:
        if not isinstance(item, dict):
            raise RolloutServerError(f"{url}/generate answered malformed JSON: expected an object, got {item!r:.200}")
        ids, meta = item.get("output_ids"), item.get("meta_info")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids) or not isinstance(meta, dict):
            raise RolloutServerError(f"{url}/generate answered malformed JSON: missing output_ids/meta_info in "
                                     f"{str(item)[:200]}")
        fr = meta.get("finish_reason")
        kind = fr.get("type") if isinstance(fr, dict) else fr
        if kind == "abort":
            raise RolloutServerError(f"{url} aborted a rollout request: {fr}")
        if kind not in ("stop", "length"):
            raise RolloutServerError(f"{url}/generate answered an unknown finish_reason {fr!r}")
        version = meta.get("weight_version")
        if self._expected_version is not None and str(version) != self._expected_version:
            raise StaleWeightsError(f"{url} generated with weight_version {version!r}, expected "
                                    f"{self._expected_version!r} (the last synced version): stale server")
        sm = meta.get(STEP_MAP_KEY)
        if sm is None:
            if self.require_step_maps:
                raise RolloutServerError(
                    f"{url} returned no meta_info.{STEP_MAP_KEY}: launch SGLang with SGLANG_PLUGINS=lrl_dllm "
                    "--dllm-algorithm LRLLowConfidence (scripts/launch_sglang.sh), or set require_step_maps=False")
            nfe = _last_int(meta.get(NFE_KEY))
            return ids, [0] * len(ids), kind, nfe, _last_int(meta.get(STORE_KEY))
        if not isinstance(sm, list) or len(sm) != len(ids) or not all(isinstance(s, int) for s in sm):
            raise RolloutServerError(f"{url}: {STEP_MAP_KEY} has {len(sm) if isinstance(sm, list) else sm!r} "
                                     f"entries for {len(ids)} output ids")
        return ids, sm, kind, len(set(sm)), _last_int(meta.get(STORE_KEY))

    def _generate_chunk(self, url: str, rows: list[list[int]], params: dict) -> list[tuple]:
        body = {"input_ids": rows, "sampling_params": params}
        out = self._request("POST", url, "/generate", json=body, idempotent=True)
        if not isinstance(out, list) or len(out) != len(rows):
            got = f"{len(out)} items" if isinstance(out, list) else type(out).__name__
            raise RolloutServerError(f"{url}/generate answered malformed JSON: expected {len(rows)} items, got {got}")
        return [self._parse_item(url, item) for item in out]

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        sampling.validate()
        if len(prompts) == 0:
            raise ValueError("generate() needs at least one prompt")
        self._ensure_ready()
        self.resume_memory()  # a rollout needs weights and KV cache resident (no-op unless released)
        self._check_decode_config(sampling)
        ids = self._encode(prompts)
        g = sampling.samples_per_prompt
        rows = [p for p in ids for _ in range(g)]
        m = self.max_rows_per_request
        starts = list(range(0, len(rows), m))
        with self._lock:
            first = self._rr
            self._rr += len(starts)
        futs = {}
        for k, s in enumerate(starts):
            url = self.urls[(first + k) % len(self.urls)]
            # distinct seeds per chunk: identical prompts in two chunks must not draw identical samples
            params = self.sglang_sampling_params(sampling, sampling.seed * 1_000_003 + k)
            futs[self._pool.submit(self._generate_chunk, url, rows[s : s + m], params)] = s
        results: list[tuple | None] = [None] * len(rows)
        try:
            for fut in cf.as_completed(futs):
                s = futs[fut]
                for j, res in enumerate(fut.result()):
                    results[s + j] = res
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        resp = [r[0] for r in results]
        lps = [r[5] for r in results]
        plans = [r[8] for r in results]
        if sampling.remasking_strategy == "planner" and any(x is None for x in plans):
            raise RolloutServerError(f"planner rollouts came back without meta_info.{PLANNER_KEY}")
        return RolloutBatch(
            prompt_ids=[list(p) for p in rows],
            response_ids=resp,
            texts=self.tokenizer.batch_decode(resp, skip_special_tokens=True),
            step_maps=[r[1] for r in results],
            num_forwards=torch.tensor([r[3] for r in results], dtype=torch.long),
            num_store_passes=torch.tensor([r[4] for r in results], dtype=torch.long),
            finish_reasons=[r[2] for r in results],
            group_index=torch.arange(len(ids)).repeat_interleave(g),
            weight_version=self.weight_version,
            sampling_logprobs=None if any(x is None for x in lps) else lps,
            tail_ids=[r[6] for r in results],
            tail_step_maps=[r[7] for r in results],
            planner_logprobs=plans if sampling.remasking_strategy == "planner" else None,
            sampling=sampling,
        )
