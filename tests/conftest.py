"""Shared fixtures: a tiny character-level block-diffusion model, built locally (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models are overhead-bound; extra threads only spin (and fight subprocesses)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lrl.models import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tiny_tokenizer):
    from lrl.models import build_tiny_model

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    lm.eval()
    return lm


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_lm, tiny_tokenizer):
    """A saved tiny checkpoint directory (SDAR identity), shared read-only by tests."""
    from lrl.models import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(tiny_lm, path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def peaky_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A random tiny model with a scaled-up output layer: confident, varied predictions, so rollouts at φ = 0.9
    differ in TPF (and in their number of denoising steps) within a group and the TPF reward gives a non-zero
    advantage."""
    from lrl.models import build_tiny_model, save_checkpoint

    lm = build_tiny_model(tiny_tokenizer, block_size=4, seed=0)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(35.0)
    path = tmp_path_factory.mktemp("peaky") / "tiny"
    save_checkpoint(lm, path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def sdar_like_checkpoint(tmp_path_factory):
    """An SDAR-format checkpoint with the real Qwen3 vocabulary (151,936 rows) and a tiny random network, as
    `scripts/make_sdar_like.py` writes it: no block_size / mask_token_id in config.json (official layout)."""
    from lrl.models.sdar_like import build_sdar_like_checkpoint

    return build_sdar_like_checkpoint(tmp_path_factory.mktemp("sdar") / "sdar_like", hidden_size=32, num_layers=1,
                                      num_heads=4, num_kv_heads=2, max_position_embeddings=1024)
