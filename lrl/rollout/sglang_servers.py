"""The server side of `SGLangRolloutGenerator`: HTTP calls, readiness, weight sync and memory/cache control.

`SGLangServerMixin` holds the methods that talk to the servers without generating: ``_request`` (timeouts, bounded
retries with backoff, errors naming the URL), ``/health`` and ``/get_model_info`` readiness, pushing new weights
(disk checkpoint or distributed broadcast) and checking every server reports the new ``weight_version``, and the
memory/cache endpoints. It also defines the errors they raise. Generation (sampling parameters, parsing answers into
a `RolloutBatch`) is in `lrl.rollout.sglang_client`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import torch

from lrl.rollout import weight_sync as ws

logger = logging.getLogger(__name__)

# SGLang 0.5.23's memory-saver tags, in the order they are resumed (weights, then KV cache)
MEMORY_TAGS = ("weights", "kv_cache")


class RolloutServerError(RuntimeError):
    """A rollout server is unreachable, failed a request, or answered something malformed."""


class StaleWeightsError(RolloutServerError):
    """A server answered with weights other than the version the trainer last synced."""


class SGLangServerMixin:
    """Server calls of `SGLangRolloutGenerator`, split out of it to keep generation and server management apart.

    Not usable alone: the methods use the connection and sync state that ``SGLangRolloutGenerator.__init__`` sets
    up (``urls``, ``worker_urls``, timeouts, retry and sync options, ``_http``, ``_pool``, ``_store``, ``_pg``...).
    """

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, url: str, path: str, *, json: Any = None, timeout: float | None = None,
                 idempotent: bool = True, expect_json: bool = True) -> Any:
        """One call with bounded retries; raises `RolloutServerError` naming ``url`` on any failure."""
        target = f"{url}{path}"
        read_timeout = self.timeout_s if timeout is None else timeout
        attempts = 1 + self.max_retries
        err: Exception | str | None = None
        for attempt in range(attempts):
            retryable = False
            try:
                resp = self._http.request(method, target, json=json,
                                          timeout=httpx.Timeout(read_timeout, connect=self.connect_timeout_s))
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the server: safe to retry
                err, retryable = exc, True
            except httpx.TimeoutException as exc:
                raise RolloutServerError(f"{target}: no answer within {read_timeout:g} s") from exc
            except httpx.TransportError as exc:  # connection dropped mid-request (server died or restarted)
                err, retryable = exc, idempotent
            else:
                if resp.status_code in (502, 503, 504) and idempotent:
                    err, retryable = f"HTTP {resp.status_code}", True
                else:
                    return self._decode(target, resp, expect_json)
            if not retryable or attempt == attempts - 1:
                break
            time.sleep(min(self.backoff_s * (2**attempt), 30.0))
        raise RolloutServerError(f"{target}: server unreachable or failing after {attempt + 1} attempt(s): "
                                 f"{type(err).__name__ if isinstance(err, Exception) else ''} {err}".strip())

    @staticmethod
    def _decode(target: str, resp: httpx.Response, expect_json: bool) -> Any:
        if resp.status_code >= 400:
            try:
                body = resp.json()
                msg = body.get("message") or body.get("error") or body if isinstance(body, dict) else body
            except ValueError:
                msg = resp.text[:500]
            raise RolloutServerError(f"{target} answered HTTP {resp.status_code}: {msg}")
        if not expect_json:
            return None
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise RolloutServerError(f"{target} answered malformed JSON: {resp.text[:200]!r}") from exc

    def _fan_out(self, urls: list[str], method: str, path: str, *, json: Any = None, timeout: float | None = None,
                 idempotent: bool = True) -> dict[str, Any]:
        futs = {u: self._pool.submit(self._request, method, u, path, json=json, timeout=timeout,
                                     idempotent=idempotent) for u in urls}
        return {u: f.result() for u, f in futs.items()}

    # ------------------------------------------------------------------ readiness
    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Wait until every server answers ``/health`` with 200, then read their ``/get_model_info``."""
        deadline = time.monotonic() + (self.health_timeout_s if timeout_s is None else timeout_s)
        pending = list(dict.fromkeys(self.urls + self.worker_urls))
        last: dict[str, str] = {}
        while pending:
            for u in list(pending):
                try:
                    r = self._http.get(f"{u}/health", timeout=httpx.Timeout(
                        max(0.5, min(5.0, deadline - time.monotonic())), connect=min(self.connect_timeout_s, 5.0)))
                    if r.status_code == 200:
                        pending.remove(u)
                        continue
                    last[u] = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    last[u] = f"{type(exc).__name__}: {exc}"
            if pending and time.monotonic() >= deadline:
                detail = "; ".join(f"{u} ({last.get(u, 'no answer')})" for u in pending)
                raise RolloutServerError(f"rollout server(s) not healthy after {self.health_timeout_s:g} s: {detail}")
            if pending:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        for u in dict.fromkeys(self.urls + self.worker_urls):
            info = self._request("GET", u, "/get_model_info", timeout=30.0)
            if not isinstance(info, dict):
                raise RolloutServerError(f"{u}/get_model_info answered malformed JSON: {info!r}")
            self._server_info[u] = info
        self._ready = True

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.wait_until_ready()

    def server_weight_versions(self) -> dict[str, str]:
        """``weight_version`` each worker reports in ``/get_model_info``."""
        out = {}
        for u, info in self._fan_out(self.worker_urls, "GET", "/get_model_info", timeout=30.0).items():
            if not isinstance(info, dict) or "weight_version" not in info:
                raise RolloutServerError(f"{u}/get_model_info has no weight_version: {info!r}")
            out[u] = str(info["weight_version"])
        return out
    # ------------------------------------------------------------------ weight sync
    def _checkpoint_store(self) -> ws.DiskCheckpointStore:
        if self._store is None:
            root = self._sync_dir or tempfile.mkdtemp(prefix="lrl-weight-sync-")
            self._store = ws.DiskCheckpointStore(root, keep=self._keep)
        return self._store

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Push new policy weights (HF parameter names) to every server and verify they report ``version``.

        ``disk``: the tensors are written next to ``template_dir``'s config/tokenizer files; ``distributed``: they
        are broadcast in buckets. Default ``version``: current + 1.
        """
        version = self.weight_version + 1 if version is None else int(version)
        self._ensure_ready()
        self._resume_weights()
        if self.weight_sync == "disk":
            store = self._checkpoint_store()
            path = ws.write_hf_checkpoint(weights, store.path_for(version), self.template_dir, dtype=self.sync_dtype)
            store.record(path)
            self.update_weights_from_disk(path, version)
        else:
            self._update_distributed(weights, version)

    def sync_from_model(self, lm, tokenizer=None, version: int | None = None,
                        state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Push a `BlockDiffusionLM`'s current weights (disk: saved with its block-diffusion identity).

        ``state_dict`` (HF names) replaces ``lm``'s own tensors, e.g. the full weights gathered from FSDP shards.
        """
        version = self.weight_version + 1 if version is None else int(version)
        weights = dict(lm.model.state_dict() if state_dict is None else state_dict)
        if self.weight_sync == "disk":
            from lrl.models.loading import save_checkpoint

            self._ensure_ready()
            store = self._checkpoint_store()
            path = store.path_for(version)
            if self.sync_dtype is not None:
                weights = {k: v.to(self.sync_dtype) if v.is_floating_point() else v for k, v in weights.items()}
            save_checkpoint(lm, path, tokenizer=tokenizer or self.tokenizer, state_dict=weights)
            store.record(path)
            self.update_weights_from_disk(path, version)
        else:
            self.update_weights(weights.items(), version)

    def sync_weights(self, weights, version: int) -> None:
        """`RolloutGenerator.sync_weights`: the full tensors of a `PolicyWeights` pushed with its model's identity
        (`sync_from_model`; the engine-only ``extra`` tensors stay behind)."""
        self.sync_from_model(weights.lm, weights.tokenizer, version, state_dict=weights.state_dict)

    def adopt_version(self, version: int) -> None:
        """Take ``version`` as current after another rank pushed it (checks that every server reports it)."""
        self._after_update(int(version))

    def update_weights_from_disk(self, path: str | os.PathLike, version: int) -> None:
        """Ask every worker to load the checkpoint at ``path`` (which it must be able to read) as ``version``."""
        self._ensure_ready()
        self._resume_weights()
        body = {"model_path": str(Path(path).resolve()), "weight_version": str(version),
                "flush_cache": self.flush_cache_after_update, "abort_all_requests": False}

        def one(url: str) -> None:
            if self.bracket_disk_updates:
                self._request("POST", url, "/begin_weight_update", json={}, timeout=self.sync_timeout_s,
                              idempotent=False)
            try:
                self._request("POST", url, "/update_weights_from_disk", json=body, timeout=self.sync_timeout_s,
                              idempotent=False)
            finally:
                if self.bracket_disk_updates:
                    self._request("POST", url, "/end_weight_update", json={}, timeout=self.sync_timeout_s,
                                  idempotent=False)

        futs = [self._pool.submit(one, u) for u in self.worker_urls]
        for f in futs:
            f.result()
        self._after_update(version)
        if self._store is not None:
            self._store.prune()

    def _after_update(self, version: int) -> None:
        want = str(version)
        versions = self.server_weight_versions()
        bad = {u: v for u, v in versions.items() if v != want}
        if bad:
            raise StaleWeightsError(f"after syncing version {want}, servers report other versions: {bad}")
        self.weight_version = version
        self._expected_version = want

    def init_weight_sync_group(self) -> None:
        """Create the distributed weight-update group (trainer = rank 0; worker i's TP ranks follow)."""
        if self._pg is not None:
            return
        self._ensure_ready()
        tp = self.server_tp_sizes
        if tp is None:
            tp = []
            for u in self.worker_urls:
                info = self._request("GET", u, "/get_server_info", timeout=30.0)
                tp.append(int(info.get("tp_size", 1)) if isinstance(info, dict) else 1)
        if len(tp) != len(self.worker_urls):
            raise ValueError(f"server_tp_sizes has {len(tp)} entries for {len(self.worker_urls)} workers")
        port = self.master_port or ws.free_port(self.master_address)
        world = 1 + sum(tp)
        offsets = [1 + sum(tp[:i]) for i in range(len(tp))]
        holder: dict[str, Any] = {}

        def join() -> None:  # rank 0 in its own thread, so a failed server call cannot leave us blocked here
            try:
                holder["pg"] = ws.init_custom_process_group(
                    backend=self.dist_backend, init_method=f"tcp://{self.master_address}:{port}", world_size=world,
                    rank=0, group_name=self.group_name, timeout_s=self.sync_timeout_s)
            except BaseException as exc:  # noqa: BLE001 - reported below
                holder["error"] = exc

        t = threading.Thread(target=join, name="lrl-weight-group", daemon=True)
        t.start()
        futs = {u: self._pool.submit(
            self._request, "POST", u, "/init_weights_update_group",
            json={"master_address": self.master_address, "master_port": port, "rank_offset": off,
                  "world_size": world, "group_name": self.group_name, "backend": self.dist_backend},
            timeout=self.sync_timeout_s, idempotent=False) for u, off in zip(self.worker_urls, offsets)}
        for u, f in futs.items():
            f.result()  # raises RolloutServerError naming u
        t.join(self.sync_timeout_s)
        if "error" in holder or "pg" not in holder:
            raise RolloutServerError(f"could not create the weight-update group at {self.master_address}:{port}: "
                                     f"{holder.get('error', 'timed out')}")
        self._pg = holder["pg"]

    def _update_distributed(self, weights, version: int) -> None:
        self.init_weight_sync_group()
        self._resume_weights()
        device = torch.device("cuda", torch.cuda.current_device()) if self.dist_backend == "nccl" else torch.device(
            "cpu")
        self._fan_out(self.worker_urls, "POST", "/begin_weight_update", json={}, timeout=self.sync_timeout_s,
                      idempotent=False)
        try:
            buckets = ws.bucket_tensors(weights, self.bucket_bytes)
            bucket = next(buckets, None)
            if bucket is None:
                raise ValueError("update_weights: no tensors to sync")
            while bucket is not None:
                nxt = next(buckets, None)
                last = nxt is None
                tensors = []
                for _, t in bucket:
                    t = t.detach()
                    if self.sync_dtype is not None and t.is_floating_point():
                        t = t.to(self.sync_dtype)
                    tensors.append(t.to(device).contiguous())
                meta = ws.bucket_metadata([(n, t) for (n, _), t in zip(bucket, tensors)])
                body = {**meta, "group_name": self.group_name, "flush_cache": self.flush_cache_after_update and last,
                        "weight_version": str(version) if last else None, "abort_all_requests": False}
                futs = [self._pool.submit(self._request, "POST", u, "/update_weights_from_distributed", json=body,
                                          timeout=self.sync_timeout_s, idempotent=False) for u in self.worker_urls]
                works = ws.broadcast_bucket(self._pg, tensors)
                try:
                    for f in futs:
                        f.result()
                except BaseException:
                    # the servers did not receive this bucket: the group may hold half-done broadcasts
                    self._drop_group()
                    raise
                for w in works:
                    w.wait()
                bucket = nxt
        finally:
            for u in self.worker_urls:
                try:
                    self._request("POST", u, "/end_weight_update", json={}, timeout=self.sync_timeout_s,
                                  idempotent=False)
                except RolloutServerError as exc:
                    logger.warning("end_weight_update failed on %s: %s", u, exc)
        self._after_update(version)

    def _drop_group(self) -> None:
        """Tear the weight-update group down on the servers and here (best effort; a later sync re-creates it)."""
        if self._pg is None:
            return
        for u in self.worker_urls:
            try:
                self._request("POST", u, "/destroy_weights_update_group", json={"group_name": self.group_name},
                              timeout=min(30.0, self.sync_timeout_s), idempotent=False)
            except RolloutServerError as exc:
                logger.warning("destroy_weights_update_group failed on %s: %s", u, exc)
        ws.destroy_process_group(self._pg)
        self._pg = None

    # ------------------------------------------------------------------ memory / cache helpers
    def flush_cache(self) -> None:
        self._fan_out(self.worker_urls, "POST", "/flush_cache", timeout=self.sync_timeout_s, idempotent=True)

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU weights and/or KV cache on every server (needs ``--enable-memory-saver``; servers must be idle).

        Body: SGLang 0.5.23's ``ReleaseMemoryOccupationReqInput`` (``tags``: ``"weights"``, ``"kv_cache"``; None =
        all)."""
        self._fan_out(self.worker_urls, "POST", "/release_memory_occupation", json={"tags": tags},
                      timeout=self.sync_timeout_s, idempotent=False)
        self._released |= set(MEMORY_TAGS if tags is None else tags)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Take back what `release_memory_occupation` freed (``ResumeMemoryOccupationReqInput``)."""
        self._fan_out(self.worker_urls, "POST", "/resume_memory_occupation", json={"tags": tags},
                      timeout=self.sync_timeout_s, idempotent=False)
        self._released -= set(MEMORY_TAGS if tags is None else tags)

    def release_memory(self) -> None:
        """Before a training phase (colocated servers): release ``release_tags`` on every server; no-op without."""
        self._ensure_ready()
        tags = [t for t in self.release_tags if t not in self._released]
        if tags:
            self.release_memory_occupation(tags)

    def resume_memory(self) -> None:
        """Before the next rollout phase: resume what `release_memory` freed (weights first, then the KV cache, as
        SGLang's RL guide orders them; a weight sync in between resumes the weights by itself)."""
        for tag in MEMORY_TAGS:
            if tag in self._released:
                self.resume_memory_occupation([tag])

    def _resume_weights(self) -> None:
        """A weight update needs the weights resident: resume them if `release_memory` released them."""
        if "weights" in self._released:
            self.resume_memory_occupation(["weights"])

    def close(self) -> None:
        """Leave the weight-update group and close connections (servers keep running)."""
        self._drop_group()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()
