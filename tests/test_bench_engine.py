"""The GPU benchmark scripts (`scripts/bench_engine.py`, `scripts/bench_rl_step.py`) at the tiny shape on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# tiny shape (scripts/bench_forward.py): every weight but the input embedding, counted by hand
# per layer: q 128·128 + k 128·64 + v 128·64 + o 128·128 + q/k norms 2·32 + MLP 3·128·384 + 2 layer norms 2·128
TINY_READ_PARAMS = 2 * (16384 + 8192 + 8192 + 16384 + 64 + 147456 + 256) + 128 + 64 * 128  # + final norm, lm_head


def test_bench_engine_floors_and_engine_tpf(tmp_path):
    import bench_engine

    out = tmp_path / "engine.json"
    res = bench_engine.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1", "2",
                             "--block-size", "4", "--prompt-len", "8", "--max-new-tokens", "8", "--tpf", "2",
                             "--bandwidth-gbs", "1", "--peak-tflops", "1", "--warmup", "1", "--repeats", "1",
                             "--decode-attention", "lengths", "--compare", "dense", "--engine-batches", "2",
                             "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert [r["rows"] for r in res["forward"]] == [1, 2]
    for row in res["forward"]:
        assert row["weight_bytes"] == 4 * TINY_READ_PARAMS  # float32
        assert row["weight_read_floor_ms"] == pytest.approx(4 * TINY_READ_PARAMS / 1e9 * 1e3)
        tokens = row["rows"] * 4
        assert row["flop_floor_ms"] == pytest.approx(2 * TINY_READ_PARAMS * tokens / 1e12 * 1e3)
        assert row["block_forward_ms"] > 0
        assert row["mfu"] == pytest.approx(row["flop_floor_ms"] / row["block_forward_ms"])
        assert row["dense_block_forward_ms"] > 0 and row["lengths_mixed_rows_block_forward_ms"] > 0
    runs = {(r["rows"], r["static_tpf"]): r for r in res["engine"]}
    assert set(runs) == {(2, 1), (2, 2)}
    for (rows, tpf), r in runs.items():
        assert r["tpf"] == tpf and r["tokens"] == rows * 8  # static strategy: exactly block_size/tpf steps a block
        # 2 blocks of 4/tpf denoising forwards, and one store pass between them (none after the last block)
        assert r["ms_per_forward"] == pytest.approx(r["seconds"] / (2 * 4 // tpf + 1) * 1e3)


def test_bench_engine_rejects_a_tpf_that_does_not_divide_the_block():
    import bench_engine

    with pytest.raises(SystemExit, match="must divide"):
        bench_engine.main(["--shape", "tiny", "--device", "cpu", "--block-size", "4", "--tpf", "3"])
    with pytest.raises(SystemExit, match="--cuda-graphs needs --device cuda"):
        bench_engine.main(["--shape", "tiny", "--device", "cpu", "--cuda-graphs"])


def test_bench_rl_step_tiny_on_cpu(tmp_path):
    import bench_rl_step

    res = bench_rl_step.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--prompts", "2",
                              "--samples", "2", "--prompt-len", "8", "--max-new-tokens", "8", "--block-size", "4",
                              "--tpf", "2", "--micro-batch-size", "3", "--out", str(tmp_path / "step.json")])
    assert set(res["seconds"]) == {"rollout", "reward", "old_logprobs", "train", "weight_sync"}
    assert all(s > 0 for s in res["seconds"].values())
    assert res["total_s"] >= sum(res["seconds"].values()) - 0.01
    assert res["responses"] == 4 and res["response_tokens"] == 32 and res["rollout_tpf"] == 2.0
    assert res["weight_version"] == 1 and res["engine_matches_policy"]



def test_profile_block_forward_tiny_on_cpu(tmp_path):
    import profile_block_forward

    out = tmp_path / "profile.json"
    res = profile_block_forward.main(["--shape", "tiny", "--device", "cpu", "--rows", "2", "--block-size", "4",
                                      "--prompt-len", "8", "--repeats", "2", "--top", "1000", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["calls_per_forward"] == sum(n for _, _, n in res["top"]) > 0
    assert res["ms_per_forward"] == pytest.approx(sum(ms for _, ms, _ in res["top"]), abs=1e-2)
    assert any("linear" in name or "addmm" in name or "mm" in name for name, _, _ in res["top"])
