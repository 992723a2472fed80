"""dUltra's ``planner`` strategy through ``lrl serve`` (spec §8.3): a served planner rollout equals the native
engine's (sampled with the same seed, and greedy), its decision log-probs reach `RolloutBatch`, a disk sync moves
the served head, and a checkpoint without a head gets a one-line 400."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from serve_utils import _start_server, _stop
from test_planner import random_head

from lrl.models import build_tiny_model, load_checkpoint, save_checkpoint
from lrl.rollout import NativeEngine, SamplingParams
from lrl.rollout.sglang_client import SGLangRolloutGenerator

PROMPTS = ["Q: 12+7=?\nA: ", "hi", "abcdefgh"]


@pytest.fixture(scope="module")
def planner_checkpoint(tmp_path_factory, tiny_tokenizer):
    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.planner = random_head(lm, seed=2, bias=-0.5)
    path = tmp_path_factory.mktemp("planner") / "tiny"
    save_checkpoint(lm, path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture(scope="module")
def server(planner_checkpoint, tmp_path_factory):
    proc, url = _start_server(planner_checkpoint, tmp_path_factory.mktemp("serve") / "server.log")
    yield url
    _stop(proc)


def _same(a, b) -> None:
    assert a.response_ids == b.response_ids and a.step_maps == b.step_maps
    assert a.tail_ids == b.tail_ids and a.tail_step_maps == b.tail_step_maps
    assert torch.equal(a.num_forwards, b.num_forwards)
    for x, y in zip(a.planner_logprobs, b.planner_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-6)
    for x, y in zip(a.sampling_logprobs, b.sampling_logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-6)


def test_served_planner_rollouts_equal_the_native_engine(server, planner_checkpoint, tmp_path):
    lm, tok = load_checkpoint(planner_checkpoint)
    eng = NativeEngine(lm.eval(), tok)
    client = SGLangRolloutGenerator(server, str(planner_checkpoint), timeout_s=60, health_timeout_s=60,
                                    max_retries=1, max_rows_per_request=64, weight_sync="disk",
                                    sync_dir=str(tmp_path))
    try:
        sp = SamplingParams(block_size=4, remasking_strategy="planner", temperature=0.8, max_new_tokens=12,
                            samples_per_prompt=3, seed=5, stop_token_ids=(tok.eos_token_id,))
        got = client.generate(PROMPTS, sp)
        # the client sends the group-expanded rows in one request with seed · 1000003 (chunk 0), one row each
        rows = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS for _ in range(3)]
        ref = eng.generate(rows, dataclasses.replace(sp, seed=5 * 1_000_003, samples_per_prompt=1))
        assert got.planner_logprobs is not None and got.group_index.tolist() == [0] * 3 + [1] * 3 + [2] * 3
        _same(got, ref)
        assert any(v < -1e-3 for lps in got.planner_logprobs for v in lps)  # genuinely stochastic decisions
        greedy = dataclasses.replace(sp, greedy=True, samples_per_prompt=1, planner_threshold=0.4)
        _same(client.generate(PROMPTS, greedy), eng.generate(PROMPTS, greedy))
        # a disk sync carries the head (planner_head.safetensors): the served decisions follow the new head
        lm.planner = random_head(lm, seed=7, bias=0.5)
        client.sync_from_model(lm, tok, version=1)
        moved = client.generate(PROMPTS, greedy)
        _same(moved, eng.generate(PROMPTS, greedy))
        assert moved.step_maps != got.step_maps[::3]
    finally:
        client.close()


def test_planner_strategy_without_a_head_is_a_400(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from lrl.serve.app import DecodeConfig, create_app

    lm, tok = load_checkpoint(tiny_checkpoint)
    app = create_app(NativeEngine(lm.eval(), tok), DecodeConfig(block_size=4), model_path=str(tiny_checkpoint))
    with TestClient(app) as http:
        assert http.get("/get_model_info").json()["lrl_planner_head"] is False
        r = http.post("/generate", json={"text": "hi", "sampling_params": {
            "max_new_tokens": 4, "custom_params": {"lrl_remasking_strategy": "planner"}}})
        assert r.status_code == 400
        assert r.json()["message"] == ("remasking_strategy 'planner' needs a checkpoint with a planner head; the "
                                       "served model has none")
        ok = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}})
        assert ok.status_code == 200 and ok.json()["meta_info"]["dllm_planner_logprobs"] is None
    with pytest.raises(ValueError, match="--strategy planner needs a checkpoint with a planner head"):
        create_app(NativeEngine(lm, tok), DecodeConfig(block_size=4, remasking_strategy="planner"))


@pytest.mark.parametrize(("info", "match"), [
    ({"weight_version": "0"}, "the SGLang plugin does not support it"),  # SGLang: no lrl_decode
    ({"weight_version": "0", "lrl_decode": {"block_size": 4}, "lrl_planner_head": False}, "has none"),
])
def test_client_refuses_the_planner_strategy_where_it_cannot_run(tiny_checkpoint, info, match):
    """The servers' /get_model_info answers as read at start-up decide before any request is sent."""
    client = SGLangRolloutGenerator("http://127.0.0.1:9", str(tiny_checkpoint), max_retries=0)
    try:
        client._server_info = {"http://127.0.0.1:9": info}
        with pytest.raises(ValueError, match=match):
            client._check_decode_config(SamplingParams(block_size=4, remasking_strategy="planner"))
    finally:
        client.close()
