"""`scripts/gpu_plan_check.py --smoke`: two RL steps of `lrl fit` (configs/sdar_1p7b_1gpu.yaml) at a tiny shape with
the real Qwen3 vocabulary on CPU, every phase measured and planned. The ±15 % check is the GPU run's (issue 28):
at this shape CPU-resident copies the plan leaves off the device (the reference, the engine's weights) dominate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_smoke_reports_every_phase(tmp_path, monkeypatch):
    import gpu_plan_check

    monkeypatch.chdir(tmp_path)
    rep = gpu_plan_check.main(["--smoke", "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert json.loads((tmp_path / "out" / "plan_check.json").read_text()) == json.loads(json.dumps(rep))
    assert rep["error"] is None
    rows = {r["phase"]: r for r in rep["phases"]}
    assert list(rows) == ["states", "rollout", "weight sync", "logprob passes", "training"]
    for r in rows.values():
        assert r["status"] == "measured" and r["planned_bytes"] > 0 and r["measured_bytes"] > 0, r
        assert r["ratio"] == r["measured_bytes"] / r["planned_bytes"]
    # both RL steps ran each phase; the states are measured once, between the steps
    assert {s for s, _ in rows["rollout"]["per_step"]} == {0, 1}
    assert {s for s, _ in rows["training"]["per_step"]} == {0, 1}
    assert [s for s, _ in rows["states"]["per_step"]] == [1]
    # training holds gradients and activations on top of the states
    assert rows["training"]["measured_bytes"] > rows["states"]["measured_bytes"]
    # the tied SDAR-1.7B layout: the plan counts the 151,936 × 32 embedding once (tiny shape of the script)
    shape = rep["shape"]
    assert shape["vocab"] == 151936 and shape["hidden"] == 32
    assert 151936 * 32 < shape["params"] < 2 * 151936 * 32
    # the synthetic task's prompts went through the real tokenizer's chat template (<|im_start|>user\n)
    assert rep["first_prompt_ids"][:3] == [151644, 872, 198]
    assert rep["prompt_tokens"] > 10


def test_tied_head_survives_the_engine_copy_and_a_weight_sync(tiny_tokenizer):
    """SDAR-1.7B ties its LM head to the embedding: the rollout engine's bf16 copy (`cast_copy`) stays tied and a
    sync's state dict (which names ``lm_head.weight`` too) is accepted (both raised KeyError before)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lrl.models import BlockDiffusionLM
    from lrl.models.config import BlockDiffusionConfig
    from lrl.models.sharding import cast_copy
    from lrl.rollout import NativeEngine

    vocab = len(tiny_tokenizer)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = BlockDiffusionLM(Qwen3ForCausalLM(cfg), BlockDiffusionConfig(mask_token_id=vocab - 1, block_size=4))
    copy = cast_copy(lm, torch.bfloat16)
    head, emb = copy.model.lm_head.weight, copy.model.model.embed_tokens.weight
    assert head is emb and head.dtype == torch.bfloat16
    assert torch.equal(emb, lm.model.model.embed_tokens.weight.to(torch.bfloat16))
    engine = NativeEngine(copy, tiny_tokenizer)
    state = {k: v + 1.0 for k, v in lm.model.state_dict().items()}  # lists lm_head.weight beside the embedding
    assert "lm_head.weight" in state
    engine.update_weights(state, version=3)
    assert engine.weight_version == 3
    assert torch.equal(copy.model.model.embed_tokens.weight, state["model.embed_tokens.weight"].to(torch.bfloat16))
