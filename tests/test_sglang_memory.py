"""`SGLangRolloutGenerator.release_memory` / `resume_memory` around training, over a mocked HTTP transport.

Colocated servers free their weights and KV cache while the trainer steps and take them back before the next
rollout, in SGLang's order (weights, then KV cache; a weight sync in between resumes the weights first). The same
calls are checked against SGLang 0.5.23's own request classes in tests/test_sglang_real.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from lrl.rollout.sglang_client import SGLangRolloutGenerator

URL = "http://server-a:30000"


def _client(tiny_checkpoint, calls, **kw):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        calls.append((path, body))
        if path == "/health":
            return httpx.Response(200)
        if path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": "3"})
        return httpx.Response(200, json={"success": True, "message": ""})

    gen = SGLangRolloutGenerator([URL], str(tiny_checkpoint), **kw)
    gen._http.close()
    gen._http = httpx.Client(transport=httpx.MockTransport(handler))
    return gen


def _memory_calls(calls):
    return [(p, b) for p, b in calls if "memory_occupation" in p or "weights_from" in p]


def test_release_and_resume_around_training(tiny_checkpoint, tmp_path):
    calls = []
    gen = _client(tiny_checkpoint, calls, release_tags=["weights", "kv_cache"], sync_dir=str(tmp_path))
    try:
        gen.release_memory()
        gen.release_memory()  # already released: nothing sent twice
        gen.update_weights_from_disk(tmp_path, 3)  # a sync while released brings the weights back first
        gen.resume_memory()
        gen.resume_memory()  # nothing left to resume
    finally:
        gen.close()
    assert _memory_calls(calls) == [
        ("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
        ("/resume_memory_occupation", {"tags": ["weights"]}),
        ("/update_weights_from_disk", {"model_path": str(tmp_path.resolve()), "weight_version": "3",
                                       "flush_cache": True, "abort_all_requests": False}),
        ("/resume_memory_occupation", {"tags": ["kv_cache"]}),
    ]


def test_resume_order_without_sync_and_default_is_noop(tiny_checkpoint):
    calls = []
    gen = _client(tiny_checkpoint, calls, release_tags=["kv_cache", "weights"])
    try:
        gen.release_memory()
        gen.resume_memory()
    finally:
        gen.close()
    assert _memory_calls(calls) == [("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
                                    ("/resume_memory_occupation", {"tags": ["weights"]}),
                                    ("/resume_memory_occupation", {"tags": ["kv_cache"]})]
    calls.clear()
    gen = _client(tiny_checkpoint, calls)  # not colocated: the hooks send nothing
    try:
        gen.release_memory()
        gen.resume_memory()
    finally:
        gen.close()
    assert _memory_calls(calls) == []


def test_unknown_release_tag_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="rollout.sglang.release_tags: unknown tags \\['kvcache'\\]"):
        SGLangRolloutGenerator([URL], str(tiny_checkpoint), release_tags=["kvcache"])
