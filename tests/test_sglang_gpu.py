"""Smoke test against a REAL SGLang 0.5.23 server with the ``lrl_dllm`` plugin (GPU only; skipped by default).

Run where SGLang and a GPU exist::

    LRL_SGLANG_CKPT=/ckpt/SDAR-1.7B-Chat LRL_SGLANG_PYTHON=/path/to/sglang-venv/bin/python \
        pytest -m "sglang and gpu" tests/test_sglang_gpu.py -s

``LRL_SGLANG_CKPT`` must be a checkpoint SGLang serves as a dLLM (``SDARForCausalLM``, ``SDARMoeForCausalLM``,
``LLaDA2MoeModelLM``); the tiny test model cannot be used (SGLang hard-codes SDAR's mask id 151669). The SGLang
environment must have this repository installed with ``pip install --no-deps -e .``. The distributed weight-sync
case needs a second GPU for the trainer (NCCL cannot put two ranks on one device).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[1]
CKPT = os.environ.get("LRL_SGLANG_CKPT")
PY = os.environ.get("LRL_SGLANG_PYTHON", sys.executable)


def _skip_reason() -> str | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU"
    except ImportError:
        return "no torch"
    if not CKPT:
        return "set LRL_SGLANG_CKPT to an SGLang-servable dLLM checkpoint"
    if PY == sys.executable and importlib.util.find_spec("sglang") is None:
        return "sglang not installed (set LRL_SGLANG_PYTHON to SGLang's interpreter)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sglang_server(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import httpx

    block = int(json.loads((Path(CKPT) / "config.json").read_text()).get("block_size", 4))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    cmd = ["bash", str(REPO / "scripts/launch_sglang.sh"), "--model", CKPT, "--port", str(port), "--python", PY,
           "--block-size", str(block), "--threshold", "0.9", "--max-running-requests", "32",
           "--config-dir", str(log_path.parent), "--mem-fraction", os.environ.get("LRL_SGLANG_MEM_FRACTION", "0.6")]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + float(os.environ.get("LRL_SGLANG_START_TIMEOUT", "900"))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"SGLang exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"SGLang did not become healthy:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield url, block
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def _client(url, **kw):
    from lrl.rollout.sglang_client import SGLangRolloutGenerator

    return SGLangRolloutGenerator(url, CKPT, timeout_s=600, health_timeout_s=60, **kw)


def _sp(tok, block, **kw):
    from lrl.rollout import SamplingParams

    base = dict(block_size=block, threshold=0.9, max_new_tokens=64, samples_per_prompt=4,
                stop_token_ids=(tok.eos_token_id,))
    return SamplingParams(**(base | kw))


PROMPTS = ["Question: what is 12 + 30? Answer:", "Write a haiku about rivers."]


def test_step_maps_and_sampling(sglang_server):
    url, block = sglang_server
    client = _client(url)
    try:
        greedy = client.generate(PROMPTS, _sp(client.tokenizer, block, greedy=True))
        for ids, sm in zip(greedy.response_ids, greedy.step_maps):
            assert len(ids) == len(sm) and (not sm or min(sm) >= 1)
        assert greedy.response_ids[0] == greedy.response_ids[1]  # greedy group: identical samples
        assert float(greedy.batch_tpf) >= 1.0
        sampled = client.generate(PROMPTS, _sp(client.tokenizer, block, temperature=1.0))
        assert len({tuple(r) for r in sampled.response_ids[:4]}) > 1, "sampling is ignored: plugin not active?"
        # the plugin streams one sampling log-prob per token (meta_info.dllm_sampling_logprobs)
        assert sampled.sampling_logprobs is not None
        assert all(len(lp) == len(r) and all(x <= 0 for x in lp)
                   for lp, r in zip(sampled.sampling_logprobs, sampled.response_ids))
        print("greedy TPF", greedy.batch_tpf, "sampled TPF", sampled.batch_tpf, greedy.texts[0][:200])
    finally:
        client.close()


def test_disk_weight_sync_and_memory(sglang_server, tmp_path):
    from safetensors.torch import load_file

    url, block = sglang_server
    client = _client(url, weight_sync="disk", sync_dir=str(tmp_path), sync_dtype="bfloat16")
    try:
        weights = {}
        for f in sorted(Path(CKPT).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        client.update_weights(weights, version=1)
        assert client.server_weight_versions() == {url: "1"}
        batch = client.generate(PROMPTS[:1], _sp(client.tokenizer, block, greedy=True, samples_per_prompt=1))
        assert batch.weight_version == 1 and batch.step_maps[0]
        client.release_memory_occupation(["kv_cache"])
        client.resume_memory_occupation(["kv_cache"])
        client.flush_cache()
        assert client.generate(PROMPTS[:1], _sp(client.tokenizer, block, greedy=True, samples_per_prompt=1))
    finally:
        client.close()


def test_distributed_weight_sync(sglang_server):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("the trainer rank needs its own GPU for NCCL")
    from safetensors.torch import load_file

    url, block = sglang_server
    torch.cuda.set_device(torch.cuda.device_count() - 1)
    client = _client(url, weight_sync="distributed", dist_backend="nccl", sync_dtype="bfloat16")
    try:
        weights = {}
        for f in sorted(Path(CKPT).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        client.update_weights(weights, version=2)
        batch = client.generate(PROMPTS[:1], _sp(client.tokenizer, block, greedy=True, samples_per_prompt=1))
        assert batch.weight_version == 2 and batch.step_maps[0]
    finally:
        client.close()
