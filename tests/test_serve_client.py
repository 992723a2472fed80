"""`SGLangRolloutGenerator` against ``lrl serve`` over HTTP on localhost (no SGLang, no GPU).

One ``lrl serve`` subprocess over the tiny checkpoint serves the module; the tests check that the client's rollouts
equal the in-process `NativeEngine`'s (tokens and step maps), that both weight-sync protocols change the served
weights, that a stale server, a dead server, an unreachable server and malformed answers give clear errors within
their timeouts, and that malformed requests get 4xx JSON answers.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from lrl.models import build_tiny_model, load_checkpoint
from lrl.rollout import NativeEngine, SamplingParams
from lrl.rollout.sglang_client import RolloutServerError, SGLangRolloutGenerator, StaleWeightsError, _last_int

PROMPTS = ["hello world", "abc", "The quick"]
REPO = Path(__file__).resolve().parents[1]


from serve_utils import _free_port, _start_server, _stop  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    proc, url = _start_server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--threshold", "0.9")
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """In-process references: A = the served checkpoint, B = a differently seeded tiny model."""
    lm_a, tok = load_checkpoint(tiny_checkpoint)
    lm_b = build_tiny_model(tok, block_size=4, seed=1)
    return NativeEngine(lm_a.eval(), tok), NativeEngine(lm_b.eval(), tok)


def _greedy(tok, **kw) -> SamplingParams:
    base = dict(block_size=4, threshold=0.9, greedy=True, max_new_tokens=16, samples_per_prompt=2,
                stop_token_ids=(tok.eos_token_id,))
    return SamplingParams(**(base | kw))


def _client(url, ckpt, **kw) -> SGLangRolloutGenerator:
    base = dict(timeout_s=60, health_timeout_s=60, max_retries=1, backoff_s=0.1, max_rows_per_request=3)
    return SGLangRolloutGenerator(url, str(ckpt), **(base | kw))


def _same(a, b) -> None:
    assert a.response_ids == b.response_ids
    assert a.step_maps == b.step_maps
    assert a.finish_reasons == b.finish_reasons
    assert a.texts == b.texts
    assert torch.equal(a.num_forwards, b.num_forwards)
    assert torch.equal(a.group_index, b.group_index)
    assert a.prompt_ids == b.prompt_ids
    # training records travel too: sampling log-probs (JSON floats) and the final block's tail
    assert a.tail_ids == b.tail_ids and a.tail_step_maps == b.tail_step_maps
    for x, y in zip(a.sampling_logprobs, b.sampling_logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-6)


def test_greedy_equals_native_engine(server, tiny_checkpoint, engines):
    eng_a, _ = engines
    client = _client(server, tiny_checkpoint)
    try:
        sp = _greedy(eng_a.tokenizer)
        got, ref = client.generate(PROMPTS, sp), eng_a.generate(PROMPTS, sp)
        _same(got, ref)
        assert torch.equal(got.num_store_passes, ref.num_store_passes)
        ids = [eng_a.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]  # token-id prompts too
        _same(client.generate(ids, sp), eng_a.generate(ids, sp))
        # a stop id the greedy rollout surely emits mid-block, so both eos policies matter
        stop = (eng_a.tokenizer.eos_token_id, ref.response_ids[0][2])
        # and a token whose first occurrence is mid-block (not a block's last position): a truncate tail
        mid = next(t for p, r in zip(ref.prompt_ids, ref.response_ids) for i, t in enumerate(r)
                   if r.index(t) == i and (len(p) + i) % 4 != 3)
        stop = (*stop, mid)
        for policy in ("truncate", "keep_final_block"):
            sp = _greedy(eng_a.tokenizer, eos_policy=policy, stop_token_ids=stop)
            got, want = client.generate(PROMPTS, sp), eng_a.generate(PROMPTS, sp)
            _same(got, want)
            assert "stop" in got.finish_reasons
            if policy == "truncate":
                assert any(got.tail_ids)  # a stop mid-block: the rest of the block came back for training
    finally:
        client.close()


def test_sampled_groups_and_step_maps(server, tiny_checkpoint, engines):
    client = _client(server, tiny_checkpoint)
    try:
        sp = SamplingParams(block_size=4, threshold=0.9, temperature=1.0, max_new_tokens=12, samples_per_prompt=4,
                            seed=3)
        batch = client.generate(PROMPTS[:2], sp)
        assert len(batch) == 8 and batch.group_index.tolist() == [0] * 4 + [1] * 4
        for ids, sm in zip(batch.response_ids, batch.step_maps):
            assert len(ids) == len(sm) == 12 and min(sm) >= 1
        assert len({tuple(r) for r in batch.response_ids[:4]}) > 1  # a group is not 4 copies of one sample
        assert (batch.tpf > 0).all() and batch.finish_reasons == ["length"] * 8
        with pytest.raises(ValueError, match="block_size"):  # the server decodes with block 4
            client.generate(PROMPTS, _greedy(engines[0].tokenizer, block_size=8))
    finally:
        client.close()


def test_disk_sync_changes_served_weights(server, tiny_checkpoint, engines, tmp_path):
    eng_a, eng_b = engines
    sp = _greedy(eng_a.tokenizer)
    ref_a, ref_b = eng_a.generate(PROMPTS, sp), eng_b.generate(PROMPTS, sp)
    assert ref_a.response_ids != ref_b.response_ids
    client = _client(server, tiny_checkpoint, weight_sync="disk", sync_dir=str(tmp_path), keep_checkpoints=1)
    try:
        client.sync_from_model(eng_b.lm, version=11)  # a BlockDiffusionLM, saved with its identity
        assert client.server_weight_versions() == {server: "11"} and client.weight_version == 11
        got = client.generate(PROMPTS, sp)
        _same(got, ref_b)
        assert got.weight_version == 11
        client.update_weights(eng_a.lm.model.state_dict(), version=12)  # a mapping + the template checkpoint
        _same(client.generate(PROMPTS, sp), ref_a)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["weights-v12"]
    finally:
        client.close()


def test_distributed_sync_changes_served_weights(server, tiny_checkpoint, engines):
    eng_a, eng_b = engines
    sp = _greedy(eng_a.tokenizer)
    client = _client(server, tiny_checkpoint, weight_sync="distributed", dist_backend="gloo", sync_timeout_s=60,
                     bucket_bytes=256 << 10)  # several buckets
    try:
        client.update_weights(eng_b.lm.model.state_dict(), version=21)
        _same(client.generate(PROMPTS, sp), eng_b.generate(PROMPTS, sp))
        client.sync_from_model(eng_a.lm, version=22)
        _same(client.generate(PROMPTS, sp), eng_a.generate(PROMPTS, sp))
        assert client.server_weight_versions() == {server: "22"}
        # a failed update (unknown parameter) is a clear error; the group is rebuilt for the next one
        with pytest.raises(RolloutServerError, match="no_such_param"):
            client.update_weights({"no_such_param": torch.zeros(2)}, version=24)
        client.update_weights(eng_a.lm.model.state_dict(), version=25)
        assert client.server_weight_versions() == {server: "25"}
    finally:
        client.close()
    # the group was destroyed on the server: a new client can create one again
    again = _client(server, tiny_checkpoint, weight_sync="distributed", dist_backend="gloo", sync_timeout_s=60)
    try:
        again.update_weights(eng_a.lm.model.state_dict(), version=23)
    finally:
        again.close()


def test_stale_server_is_detected(server, tiny_checkpoint, engines, tmp_path):
    eng_a, _ = engines
    client = _client(server, tiny_checkpoint, sync_dir=str(tmp_path))
    try:
        client.sync_from_model(eng_a.lm, version=31)
        # the server falls back to an older version behind the trainer's back
        httpx.post(f"{server}/update_weight_version", json={"new_version": "30"}, timeout=10).raise_for_status()
        with pytest.raises(StaleWeightsError, match=r"weight_version '30', expected '31'"):
            client.generate(PROMPTS, _greedy(eng_a.tokenizer))
        with pytest.raises(StaleWeightsError, match="30"):
            SGLangRolloutGenerator(server, str(tiny_checkpoint), expected_server_version="31").generate(
                PROMPTS, _greedy(eng_a.tokenizer))
    finally:
        httpx.post(f"{server}/update_weight_version", json={"new_version": "31"}, timeout=10)
        client.close()


BAD_REQUESTS = [
    ("/generate", b"{not json"),
    ("/generate", {}),
    ("/generate", {"text": "a", "input_ids": [1]}),
    ("/generate", {"text": 5}),
    ("/generate", {"input_ids": [[]]}),
    ("/generate", {"input_ids": [1, 10**9]}),
    ("/generate", {"text": "a", "sampling_params": "greedy"}),
    ("/generate", {"text": "a", "sampling_params": {"temprature": 0}}),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 100000}}),
    ("/generate", {"text": ["a", "b"], "sampling_params": [{}]}),
    ("/generate", {"text": "a", "stream": True}),
    ("/update_weights_from_disk", {"model_path": "/nonexistent/ckpt"}),
    ("/update_weights_from_disk", {}),
    ("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}),
    ("/end_weight_update", {}),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                    "world_size": 2, "backend": "nccl"}),
    ("/destroy_weights_update_group", {"group_name": "nope"}),
]


@pytest.mark.parametrize("path,body", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_REQUESTS)])
def test_malformed_requests_get_4xx_json(server, path, body):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {
        "json": body}
    r = httpx.post(f"{server}{path}", timeout=30, **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    payload = r.json()
    assert payload["success"] is False and payload["message"]


def test_update_bracket_is_enforced(server):
    assert httpx.post(f"{server}/begin_weight_update", json={}, timeout=10).status_code == 200
    try:
        again = httpx.post(f"{server}/begin_weight_update", json={}, timeout=10)
        assert again.status_code == 400 and "already open" in again.json()["message"]
        r = httpx.post(f"{server}/update_weights_from_distributed",
                       json={"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "none"}, timeout=10)
        assert r.status_code == 400 and "init_weights_update_group" in r.json()["message"]
    finally:
        assert httpx.post(f"{server}/end_weight_update", json={}, timeout=10).status_code == 200
    r = httpx.post(f"{server}/update_weights_from_distributed",
                   json={"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}, timeout=10)
    assert r.status_code == 400 and "begin_weight_update" in r.json()["message"]


def test_info_and_noop_endpoints(server):
    info = httpx.get(f"{server}/get_model_info", timeout=10).json()
    assert info["lrl_decode"]["block_size"] == 4 and info["architectures"] == ["SDARForCausalLM"]
    assert httpx.get(f"{server}/get_weight_version", timeout=10).json()["weight_version"] == info["weight_version"]
    assert httpx.get(f"{server}/health_generate", timeout=30).status_code == 200
    for path in ("/flush_cache", "/release_memory_occupation", "/resume_memory_occupation"):
        assert httpx.post(f"{server}{path}", json={"tags": None}, timeout=10).json()["success"] is True
    single = httpx.post(f"{server}/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 5,
                                                                                     "temperature": 0}}, timeout=30)
    out = single.json()
    assert set(out) == {"text", "output_ids", "meta_info"} and len(out["meta_info"]["dllm_step_map"]) == 5
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_unreachable_server_fails_fast(tiny_checkpoint):
    url = f"http://127.0.0.1:{_free_port()}"
    client = SGLangRolloutGenerator(url, str(tiny_checkpoint), health_timeout_s=1.0, connect_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match=url.replace(".", r"\.")):
        client.generate(["a"], SamplingParams(block_size=4, max_new_tokens=4))
    assert time.monotonic() - t0 < 10
    client.close()


class _BadServer(http.server.BaseHTTPRequestHandler):
    """Healthy, but /generate answers ``self.server.body``."""

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send(200, json.dumps({"weight_version": "default"}).encode() if "model_info" in self.path else b"ok")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(200, self.server.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body,match", [
    (b"<html>oops</html>", "malformed JSON"),
    (b'{"text": "x"}', "expected 1 items"),
    (b'[{"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length"}}}]', "no meta_info.dllm_step_map"),
    (b'[{"output_ids": [1], "meta_info": {"finish_reason": {"type": "abort", "message": "x"}}}]', "aborted"),
    (b'[{"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}, "dllm_step_map": [1, 2]}}]',
     "2 entries for 1 output ids"),
    (b'[{"output_ids": [1], "meta_info": {"finish_reason": {"type": "length"}, "dllm_step_map": [1], '
     b'"dllm_sampling_logprobs": [-1.0, -2.0]}}]', "dllm_sampling_logprobs has 2 entries for 1 output ids"),
    (b'[{"output_ids": [1], "meta_info": {"finish_reason": {"type": "stop"}, "dllm_step_map": [1], '
     b'"dllm_tail_ids": [5, 6], "dllm_tail_step_map": [1]}}]', "dllm_tail_ids / dllm_tail_step_map"),
])
def test_malformed_server_answers_name_the_url(tiny_checkpoint, body, match):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadServer)
    srv.body = body
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    client = SGLangRolloutGenerator(url, str(tiny_checkpoint), timeout_s=5, health_timeout_s=5)
    try:
        with pytest.raises(RolloutServerError, match=match) as info:
            client.generate(["a"], SamplingParams(block_size=4, max_new_tokens=4))
        assert url in str(info.value)
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()


def test_server_killed_mid_run_raises_within_timeout(tiny_checkpoint, tmp_path):
    proc, url = _start_server(tiny_checkpoint, tmp_path / "victim.log", "--threshold", "1.0", "--max-rows", "4")
    client = SGLangRolloutGenerator(url, str(tiny_checkpoint), timeout_s=30, max_retries=2, backoff_s=0.2,
                                    connect_timeout_s=1.0, max_rows_per_request=4)
    try:
        client.wait_until_ready()
        # ~2400 one-token forwards in 4 requests that the server runs one after another: seconds of work
        sp = SamplingParams(block_size=4, threshold=1.0, greedy=True, max_new_tokens=480, samples_per_prompt=4)
        box: dict = {}

        def run():
            try:
                box["batch"] = client.generate(["a", "b", "c", "d"], sp)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                box["error"] = exc

        t = threading.Thread(target=run, daemon=True)
        t0 = time.monotonic()
        t.start()
        time.sleep(1.0)
        proc.kill()
        t.join(30)
        assert not t.is_alive(), "generate() hung after the server died"
        assert "batch" not in box, "generation finished before the kill; make it longer"
        assert isinstance(box["error"], RolloutServerError) and url in str(box["error"])
        assert time.monotonic() - t0 < 30
    finally:
        _stop(proc)
        client.close()


def test_config_fragment_matches_the_client_signature():
    """Every key of configs/rollout/sglang.yaml's `sglang:` block is a constructor argument of the client."""
    import inspect

    import yaml

    from lrl.rollout.sglang_client import SGLangRolloutGenerator

    cfg = yaml.safe_load((REPO / "configs" / "rollout" / "sglang.yaml").read_text())
    rollout = cfg["data"]["init_args"]["rollout"]
    assert rollout["kind"] == "sglang" and rollout["urls"] == ["http://127.0.0.1:30000"]
    params = inspect.signature(SGLangRolloutGenerator.__init__).parameters
    unknown = set(rollout["sglang"]) - set(params)
    assert not unknown, f"sglang.yaml keys unknown to SGLangRolloutGenerator: {unknown}"


def test_last_int_normalizes_counters():
    assert _last_int(None) == 0 and _last_int(7) == 7 and _last_int([1, 1, 3, None]) == 3 and _last_int([]) == 0


def _answering(body: bytes):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BadServer)
    srv.body = body
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.mark.parametrize("with_logprobs", [True, False])
def test_plugin_shaped_answer_gives_sampling_logprobs(tiny_checkpoint, with_logprobs):
    """What the lrl_dllm SGLang plugin streams (token-sliced customized_info: step ids, cumulative counters and one
    sampling log-prob per token) becomes `RolloutBatch.sampling_logprobs`; without them the batch has None."""
    meta = {"finish_reason": {"type": "stop", "matched": 7}, "weight_version": "default",
            "dllm_step_map": [1, 1, 2], "dllm_nfe": [2, 2, 2], "dllm_store_passes": [1, 1, 1]}
    if with_logprobs:
        meta["dllm_sampling_logprobs"] = [-0.25, -1.5, -3.0]
    srv, url = _answering(json.dumps([{"output_ids": [5, 6, 7], "meta_info": meta}]).encode())
    client = SGLangRolloutGenerator(url, str(tiny_checkpoint), timeout_s=5, health_timeout_s=5)
    try:
        sp = SamplingParams(block_size=4, max_new_tokens=4, temperature=0.7, top_k=5)
        batch = client.generate(["a"], sp)
        assert batch.sampling_logprobs == ([[-0.25, -1.5, -3.0]] if with_logprobs else None)
        assert batch.tail_ids == [[]] and batch.step_maps == [[1, 1, 2]] and batch.num_forwards.tolist() == [2]
        assert batch.sampling is sp  # training scores under the temperature / top-k the client asked for
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()
