"""`lrl serve` refuses what it cannot serve correctly: oversized bodies (413), malformed sampling fields (400),
disk weight updates that are partial, non-finite, of the wrong dtype or truncated (400, weights untouched); and a
request without a seed samples with a fresh one. In-process through FastAPI's TestClient on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import lrl.serve.app as serve_app
from lrl.models import load_checkpoint
from lrl.rollout import NativeEngine


@pytest.fixture()
def client(tiny_checkpoint):
    lm, tok = load_checkpoint(tiny_checkpoint)
    app = serve_app.create_app(NativeEngine(lm.eval(), tok), serve_app.DecodeConfig(block_size=4),
                               max_request_bytes=4096)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.lm = lm
        yield c


def _post_raw(client, path: str, body: bytes):
    return client.post(path, content=body, headers={"content-type": "application/json"})


def test_oversized_bodies_get_413(client):
    big = json.dumps({"text": "a" * 5000}).encode()
    r = _post_raw(client, "/generate", big)
    assert r.status_code == 413 and "4096 bytes" in r.json()["message"]

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000
        yield b'{"text": "a"}'

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert client.post("/generate", json={"text": "ab", "sampling_params": {"max_new_tokens": 4}}).status_code == 200


BAD_SAMPLING = [
    (b'{"text": "a", "sampling_params": {"temperature": 1e999}}', "temperature"),
    (b'{"text": "a", "sampling_params": {"temperature": NaN}}', "temperature"),
    (b'{"text": "a", "sampling_params": {"temperature": -0.5}}', "temperature"),
    (b'{"text": "a", "sampling_params": {"top_p": Infinity}}', "top_p"),
    (b'{"input_ids": [true, false]}', "input_ids"),
    (b'{"input_ids": [[1.0, 2]]}', "input_ids"),
    (b'{"text": "a", "sampling_params": {"sampling_seed": -1}}', "sampling_seed"),
    (b'{"text": "a", "sampling_params": {"sampling_seed": 1.5}}', "sampling_seed"),
    (b'{"text": "a", "sampling_params": {"max_new_tokens": "8"}}', "max_new_tokens"),
    (b'{"text": "a", "sampling_params": {"stop_token_ids": [true]}}', "stop_token_ids"),
]


@pytest.mark.parametrize("body, field", BAD_SAMPLING, ids=[b.decode()[:60] for b, _ in BAD_SAMPLING])
def test_sampling_fields_are_validated(client, body, field):
    r = _post_raw(client, "/generate", body)
    assert r.status_code == 400, r.text
    assert field in r.json()["message"]


def test_a_request_without_seed_gets_a_fresh_one(client, monkeypatch):
    seeds = iter([7, 8])
    monkeypatch.setattr(serve_app.secrets, "randbelow", lambda n: next(seeds))
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 16, "temperature": 1.0}}
    unseeded = [client.post("/generate", json=body).json()["output_ids"] for _ in range(2)]
    seeded = [client.post("/generate", json=body | {"sampling_params": body["sampling_params"] | {
        "sampling_seed": s}}).json()["output_ids"] for s in (7, 8)]
    assert unseeded == seeded  # each unseeded request drew its own seed (it was seed 0 for all before)
    assert seeded[0] != seeded[1]  # and different seeds sample differently on this model


def _state(client) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in client.lm.model.state_dict().items()}


def _version(client) -> str:
    return client.get("/get_weight_version").json()["weight_version"]


def test_disk_updates_are_checked_before_the_swap(client, tmp_path):
    full = {k: v.clone() + 0.5 for k, v in client.lm.model.state_dict().items()}
    before, version = _state(client), _version(client)
    cases = {
        "partial": ({"lm_head.weight": full["lm_head.weight"]}, "incomplete"),
        "nan": (full | {"lm_head.weight": torch.full_like(full["lm_head.weight"], float("nan"))}, "non-finite"),
        "int64": ({k: v.long() for k, v in full.items()}, "wrong dtype"),
        "shape": (full | {"lm_head.weight": full["lm_head.weight"][:, :3].contiguous()}, "shape mismatch"),
        "truncated": (full, "cannot load weights"),
    }
    for name, (tensors, expected) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        if name == "truncated":
            f = d / "model.safetensors"
            f.write_bytes(f.read_bytes()[:-100])
        r = client.post("/update_weights_from_disk", json={"model_path": str(d), "weight_version": name})
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert expected in r.json()["message"], (name, r.json()["message"])
        assert _version(client) == version
        for k, v in _state(client).items():
            assert torch.equal(v, before[k]), f"{name}: {k} changed"
    good = tmp_path / "good"
    good.mkdir()
    save_file({k: v.double() if k == "lm_head.weight" else v for k, v in full.items()}, str(good / "model.safetensors"))
    r = client.post("/update_weights_from_disk", json={"model_path": str(good), "weight_version": "v2"})
    assert r.status_code == 200, r.text
    assert _version(client) == "v2"
    after = _state(client)
    assert all(torch.equal(after[k], full[k].to(after[k].dtype)) for k in after)  # float64 cast on load
