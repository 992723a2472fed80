"""The memory plan (`lrl.plan`) against measured peaks on CPU, its preflight refusal, and the shipped GPU configs.

Measured peaks are live tensor bytes (`LiveTensorBytes`: every storage an operator creates, from creation until
freed), which is what the plan's activation formulas model. Gradients exist before the measured step (a warm-up
backward), so a measured training peak is activations and transients only, as the plan's training-activation row.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lrl.algorithms.logprobs import Scoring, backward_logprobs, pack_samples, response_logprobs
from lrl.config_files import merged_config
from lrl.models.block_lm import BlockDiffusionLM
from lrl.models.config import BlockDiffusionConfig
from lrl.plan import build_plan, format_plan
from lrl.plan import components as C
from lrl.plan.measure import LiveTensorBytes, peak_bytes
from lrl.plan.shapes import ModelShape, load_shape

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


def _model(hidden, inter, layers, heads, kv_heads, head_dim, vocab, checkpointing):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    lm = BlockDiffusionLM(Qwen3ForCausalLM(cfg), BlockDiffusionConfig(mask_token_id=vocab - 1, block_size=BLOCK))
    lm.train()
    if checkpointing:
        lm.model.model.gradient_checkpointing_enable()
    return lm


def _shape(lm) -> ModelShape:
    c, layers = lm.model.config, lm.model.model.layers
    params = sum(p.numel() for p in lm.parameters())
    per_layer = sum(p.numel() for p in layers[0].parameters())
    return ModelShape("test", c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                      c.num_key_value_heads, c.head_dim, c.vocab_size, params, per_layer,
                      params - per_layer * len(layers), max(p.numel() for p in lm.parameters()))


def _rollouts(n, prompt, response, steps_per_block, vocab):
    """Random responses whose blocks take ``steps_per_block`` distinct steps each (trajectory rounds)."""
    rnd = random.Random(0)
    prompts = [[rnd.randrange(vocab - 1) for _ in range(prompt)] for _ in range(n)]
    responses = [[rnd.randrange(vocab - 1) for _ in range(response)] for _ in range(n)]
    # position j of block b is unmasked at step b·spb + 1 + (j mod spb): spb distinct steps in every block
    step_maps = [[j // BLOCK * steps_per_block + 1 + j % steps_per_block for j in range(response)]] * n
    return prompts, responses, step_maps


# (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, rows, response, estimator, steps/block, copies,
#  rows_per_forward); the last case is SDAR-1.7B's width at one layer
CASES = [
    (256, 768, 2, 4, 2, 64, 1000, 1, 512, "single_pass", 4, 8, 64),
    (512, 1536, 3, 8, 4, 64, 1000, 1, 256, "single_pass", 4, 8, 64),
    (256, 768, 2, 4, 2, 64, 20000, 1, 128, "single_pass", 4, 8, 64),
    (256, 768, 2, 4, 2, 64, 1000, 3, 128, "single_pass", 4, 8, 64),
    (256, 768, 2, 4, 2, 64, 1000, 1, 128, "trajectory", 6, 3, 64),
    (256, 768, 2, 4, 2, 64, 1000, 2, 128, "trajectory", 8, 8, 1),
    (2048, 6144, 1, 16, 8, 128, 1000, 1, 256, "single_pass", 4, 8, 64),
]


def _measure(case, checkpointing):
    hidden, inter, layers, heads, kv_heads, head_dim, vocab, n, response, est, spb, copies, rpf = case
    lm = _model(hidden, inter, layers, heads, kv_heads, head_dim, vocab, checkpointing)
    prompts, responses, step_maps = _rollouts(n, 32, response, spb, vocab)
    kw = dict(scoring=Scoring(est, block_size=BLOCK, pad_id=0, max_copies=copies, rows_per_forward=rpf))

    def train_step():
        backward_logprobs(lm, prompts, responses, step_maps, loss_fn=lambda lp, i, e: (lp.sum(), False),
                          backward=lambda loss: loss.backward(), **kw)

    train_step()  # gradients exist from here on, as from the second micro-batch of a step
    trained = peak_bytes(train_step)
    with torch.no_grad():
        no_grad = peak_bytes(lambda: response_logprobs(lm, prompts, responses, step_maps, **kw))
    packed = pack_samples(prompts, responses, step_maps, estimator=est, block_size=BLOCK, pad_id=0,
                          max_copies=copies)
    n_rows = packed.input_ids.shape[0]
    rows = min(rpf, n_rows)
    row, per_response = C.training_row(est, 32, response, BLOCK, copies, rounds=spb, model_block=BLOCK)
    assert per_response * n == n_rows  # the plan's packing is the code's
    shape = _shape(lm)
    planned = C.training_activation_bytes(shape, rows, row, checkpointing=checkpointing, compute_bytes=4,
                                          residual_bytes=4, sdpa_mask=True)
    planned_no_grad = C.inference_activation_bytes(shape, rows, row, compute_bytes=4, residual_bytes=4,
                                                   sdpa_mask=True)
    return trained, planned, no_grad, planned_no_grad


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", CASES[:-1], ids=[f"h{c[0]}-{c[9]}-r{c[7]}-v{c[6]}" for c in CASES[:-1]])
def test_activation_figures_within_15_percent_of_measured(case, checkpointing):
    trained, planned, no_grad, planned_no_grad = _measure(case, checkpointing)
    assert 0.85 <= planned / trained <= 1.15, (planned, trained)
    assert 0.85 <= planned_no_grad / no_grad <= 1.15, (planned_no_grad, no_grad)


def test_activation_figures_at_sdar_1p7b_width():
    trained, planned, no_grad, planned_no_grad = _measure(CASES[-1], checkpointing=True)
    assert 0.85 <= planned / trained <= 1.15, (planned, trained)
    assert 0.85 <= planned_no_grad / no_grad <= 1.15, (planned_no_grad, no_grad)


def test_checkpointing_keeps_one_layer_input_per_layer():
    """Direction check of the measurement itself: with checkpointing, a second layer adds R·S·H float32 values."""
    peaks = []
    for layers in (1, 2):
        lm = _model(256, 768, layers, 4, 2, 64, 1000, checkpointing=True)
        prompts, responses, step_maps = _rollouts(1, 32, 256, 4, 1000)
        with LiveTensorBytes() as mode:
            logp, _ = response_logprobs(lm, prompts, responses, step_maps, Scoring("single_pass", block_size=BLOCK))
            peaks.append(mode.current)
        del logp
    positions = (32 + 256) + 256  # clean row + one window of whole blocks
    assert peaks[1] - peaks[0] == positions * 256 * 4


def test_model_states_are_the_measured_adamw_states(tiny_lm):
    """Weights and AdamW moments of the plan equal what torch allocates (float32: 4 + 8 bytes per parameter)."""
    import copy

    lm = copy.deepcopy(tiny_lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    for p in lm.parameters():
        p.grad = torch.zeros_like(p)
    with LiveTensorBytes() as mode:
        opt.step()
    shape = _shape(lm)
    plan = build_plan({"checkpoint": "x", "block_size": 4, "model": {"class_path": "lrl.module.LightningRLModule"},
                       "trainer": {"precision": "32-true", "devices": 1}}, shape=shape, device_gb=1)
    rows = {r.component: r.bytes for r in plan.rows}
    assert mode.current == rows["optimizer states (AdamW)"] == 2 * shape.params * 4
    assert rows["policy weights"] == sum(p.numel() * p.element_size() for p in lm.parameters())


def test_sdar_8b_shape_and_kv_bytes():
    shape = load_shape("checkpoints/SDAR-8B-Chat-b32")  # no weights here: the known shape
    assert shape.kv_bytes_per_token * 2 == 147_456  # 2 × 36 layers × 8 heads × 128 × 2 bytes
    assert 8.1e9 < shape.params < 8.3e9
    assert shape.root_params == 2 * 151936 * 4096 + 4096  # untied embeddings + output layer + final norm


def test_the_config_as_shipped_before_this_issue_does_not_fit():
    """DDP, SDPA masks, 8 rows per forward, no KV budget: far over 80 GB, and the refusal names a knob."""
    cfg = merged_config([str(ROOT / "configs" / "sdar_8b_b32.yaml")])
    cfg["trainer"]["strategy"] = "ddp"
    cfg["model"]["init_args"].update(rows_per_forward=8, max_copies=8, attention="sdpa")
    cfg["data"]["init_args"]["rollout"].pop("kv_cache_gb", None)
    plan = build_plan(cfg, world_size=8, device_gb=80)
    assert not plan.fits and plan.peak_bytes > 500e9
    line = plan.refusal()
    assert "\n" not in line and ("kv_cache_gb" in line or "rows_per_forward" in line)


GPU_CONFIGS = [  # (config files, world size, GB per GPU) of every shipped GPU config
    (["configs/sdar_8b_b32.yaml"], 8, 80),
    (["configs/sdar_1p7b_1gpu.yaml"], 1, 80),
    (["configs/sdar_8b_lora_1gpu.yaml"], 1, 80),
]


@pytest.mark.parametrize("files, world, gb", GPU_CONFIGS, ids=[c[0][0] for c in GPU_CONFIGS])
def test_shipped_gpu_configs_pass_their_plan(files, world, gb):
    plan = build_plan(merged_config([str(ROOT / f) for f in files]), world_size=world, device_gb=gb)
    assert plan.fits, format_plan(plan)


def test_fit_refuses_a_config_that_cannot_fit_in_one_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """On a (pretended) 1 MB GPU, `lrl fit` stops before loading anything: one line, exit status 2."""
    from lrl.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=10**6))
    out = tmp_path / "run"
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(tiny_checkpoint),
            "--block_size=4", "--trainer.accelerator=gpu", f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert err.startswith("lrl: error: memory plan:") and len(err.splitlines()) == 1, err
    assert "lower " in err and not out.exists()


def test_plan_command_exit_status(capsys):
    from lrl.plan.command import main

    cfg = str(ROOT / "configs" / "sdar_8b_b32.yaml")
    assert main(["--config", cfg, "--world_size", "8", "--device_gb", "80"]) == 0
    assert "verdict: FITS" in capsys.readouterr().out
    assert main(["--config", cfg, "--world_size", "8", "--device_gb", "24"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
