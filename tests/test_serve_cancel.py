"""`lrl serve` stops the generation of a client that went away (`lrl.serve.cancel`): a real server process, a
client that gives up on a long request, and the next request served by the same, intact engine."""

from __future__ import annotations

import time

import httpx
import pytest
from serve_utils import _start_server, _stop

SHORT = {"text": "12+3=", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


@pytest.mark.timeout(300)
def test_disconnected_client_cancels_its_generation(tiny_checkpoint, tmp_path):
    # threshold 1: about one token per forward, so the long request below takes hundreds of forwards
    proc, url = _start_server(tiny_checkpoint, tmp_path / "serve.log", "--threshold", "1.0")
    try:
        before = httpx.post(f"{url}/generate", json=SHORT, timeout=60).json()["output_ids"]
        assert httpx.get(f"{url}/get_server_info", timeout=10).json()["lrl_cancelled_generations"] == 0
        # 256 rows × 240 tokens, no stop: hundreds of forwards (about 10 s on this CPU), far longer than the client
        # waits (0.5 s)
        long = {"text": ["1+2="] * 256, "sampling_params": {"max_new_tokens": 240, "temperature": 0,
                                                             "ignore_eos": True}}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/generate", json=long, timeout=httpx.Timeout(10.0, read=0.5))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/get_server_info", timeout=10).json()["lrl_cancelled_generations"] == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the abandoned generation was not cancelled:\n" + (tmp_path / "serve.log").read_text()[-2000:])
        # the engine is intact: the same greedy request gives the same tokens
        assert httpx.post(f"{url}/generate", json=SHORT, timeout=60).json()["output_ids"] == before
        assert proc.poll() is None
    finally:
        _stop(proc)
