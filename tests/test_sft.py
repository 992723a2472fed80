"""Block-diffusion SFT: masking rules (hand-checked), row construction, the loss, a CLI smoke run, learning."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from datamodules.sft import LengthGroupedBatches, SFTDataModule, build_sft_row, collate_sft
from lrl.sft import BlockDiffusionSFT, masked_diffusion_loss, sample_noisy_masks


def _fake_rand(block_draws, position_draws):
    """A torch.rand replacement returning the given (B, num_blocks) then (B, L) values, in call order."""
    queue = [torch.tensor(block_draws), torch.tensor(position_draws)]

    def rand(*shape, generator=None, device=None):
        out = queue.pop(0)
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out

    return rand


# ------------------------------------------------------------------ masking
def test_masks_hand_checked(monkeypatch):
    # L = 10, block 4 → blocks [0-3] [4-7] [8-9] from absolute position 0; prompt = 0..2, response = 3..8, pad = 9.
    resp = torch.tensor([[False, False, False, True, True, True, True, True, True, False]])
    t = [[0.5, 0.2, 0.9]]
    u = [[0.0, 0.0, 0.0, 0.4, 0.1, 0.3, 0.15, 0.25, 0.95, 0.0]]
    monkeypatch.setattr(torch, "rand", _fake_rand(t, u))
    masks, ratios = sample_noisy_masks(resp, 4, min_mask_ratio=0.0, complementary=True)
    assert masks.shape == (1, 2, 10) and ratios.shape == (1, 2, 10)
    # prompt positions 0-2 have u = 0 < t but are never masked; padding (9) neither
    assert masks[0, 0].tolist() == [False, False, False, True, True, False, True, False, False, False]
    # the complement masks exactly the response positions the first copy keeps
    assert masks[0, 1].tolist() == [False, False, False, False, False, True, False, True, True, False]
    # position 3 is response but in block 0 (aligned to 0, not to the response start): it gets block 0's ratio
    assert ratios[0, 0].tolist() == pytest.approx([0.5] * 4 + [0.2] * 4 + [0.9] * 2)
    assert ratios[0, 1].tolist() == pytest.approx([0.5] * 4 + [0.8] * 4 + [0.1] * 2)


def test_min_mask_ratio_rescales_t(monkeypatch):
    resp = torch.ones(1, 4, dtype=torch.bool)
    monkeypatch.setattr(torch, "rand", _fake_rand([[0.0]], [[0.0, 0.05, 0.1, 0.2]]))
    masks, ratios = sample_noisy_masks(resp, 4, min_mask_ratio=0.1)
    assert ratios[0, 0].tolist() == pytest.approx([0.1] * 4)  # t = ε + (1 − ε)·0
    assert masks[0, 0].tolist() == [True, True, False, False]


def test_masks_statistics_per_block():
    # one ratio per (row, block): within a block the masked fraction follows that block's t
    gen = torch.Generator().manual_seed(0)
    resp = torch.zeros(4000, 16, dtype=torch.bool)
    resp[:, 5:] = True
    masks, ratios = sample_noisy_masks(resp, 8, min_mask_ratio=0.0, generator=gen)
    m, r = masks[:, 0], ratios[:, 0]
    assert not m[:, :5].any()
    assert torch.equal(r[:, :8], r[:, :1].expand(-1, 8)) and torch.equal(r[:, 8:], r[:, 8:9].expand(-1, 8))
    assert not torch.equal(r[:, 0], r[:, 8])
    # E[masked | t] = t: regress the masked fraction of block 1 on its ratio
    frac = m[:, 8:].float().mean(1)
    assert (frac - r[:, 8]).mean().abs() < 0.02
    assert torch.corrcoef(torch.stack([frac, r[:, 8]]))[0, 1] > 0.85


def test_mask_validation():
    with pytest.raises(ValueError, match="block_size"):
        sample_noisy_masks(torch.ones(1, 4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="min_mask_ratio"):
        sample_noisy_masks(torch.ones(1, 4, dtype=torch.bool), 4, min_mask_ratio=1.0)
    with pytest.raises(ValueError, match="response_mask"):
        sample_noisy_masks(torch.ones(1, 4), 4)


# ------------------------------------------------------------------ rows
def test_rows_eos_is_a_target_and_fills_its_block():
    eos, pad = 0, 1
    ids, plen = build_sft_row([10, 11, 12], [20, 21], eos, block_size=4)
    assert (ids, plen) == ([10, 11, 12, 20, 21, eos, eos, eos], 3)  # fill to the end of EOS's block (pos 8)
    short, _ = build_sft_row([10, 11, 12], [20], eos)
    assert short == [10, 11, 12, 20, eos]
    batch = collate_sft([(ids, plen), (short, 3)], pad_id=pad)
    assert batch["input_ids"].tolist() == [ids, short + [pad] * 3]
    assert batch["lengths"].tolist() == [8, 5]
    assert batch["response_mask"].tolist() == [
        [False] * 3 + [True] * 5,
        [False] * 3 + [True, True] + [False] * 3,  # EOS (pos 4) is a target, padding is not
    ]


def test_length_grouped_batches_cover_every_row_once():
    lengths = [(i * 37) % 101 for i in range(250)]
    sampler = LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(0), group=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 16
    assert sorted(i for b in batches for i in b) == list(range(250))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30  # rows of a batch have similar lengths (random batches: ~85)
    again = list(LengthGroupedBatches(lengths, 16, torch.Generator().manual_seed(0), group=4))
    assert again == batches


def test_datamodule_tokenizer_and_holdout(tmp_path):
    dm = SFTDataModule(str(tmp_path / "missing"), block_size=8, task_kwargs={"num_train": 300, "num_eval": 20},
                       exclude_eval_of=[{"num_train": 5, "num_eval": 50}], batch_size=4, val_size=3)
    assert not dm.from_checkpoint
    assert dm.tokenizer.unk_token_id not in dm.tokenizer(dm.task.char_set()).input_ids
    dm.setup("fit")
    banned = {r["question"] for r in dm._exclude[0].load("eval")}
    assert banned and not banned & {r["question"] for r in dm.train_records()}
    batch = next(iter(dm.train_dataloader()))
    rows = batch["input_ids"]
    for i in range(rows.shape[0]):
        n, p = int(batch["lengths"][i]), int(batch["prompt_lengths"][i])
        assert n % 8 == 0 and rows[i, n - 1] == dm.tokenizer.eos_token_id
        text = dm.tokenizer.decode(rows[i, :p])
        assert text.startswith("Q: ") and text.endswith("\nA: ")
    val = next(iter(dm.val_dataloader()))
    assert len(val["prompts"]) == 3 and val["prompts"][0] == dm.task.prompt(val["records"][0])
    with pytest.raises(ValueError, match="batch_size"):
        SFTDataModule(str(tmp_path / "missing"), batch_size=0)


# ------------------------------------------------------------------ loss
class _StubLM(torch.nn.Module):
    """Returns logits that put all mass on the clean token of each position it is asked about."""

    def __init__(self, vocab: int, resp: torch.Tensor):
        super().__init__()
        self.vocab, self.resp, self.calls = vocab, resp, []
        self.scale = torch.nn.Parameter(torch.tensor(50.0))

    def diffusion_logits(self, ids, masks, lengths, block_size):
        self.calls.append((masks.clone(), block_size))
        assert not (masks & ~self.resp[:, None]).any(), "a non-response position was masked"
        b, _, l_idx = masks.nonzero(as_tuple=True)
        return torch.nn.functional.one_hot(ids[b, l_idx], self.vocab).float() * self.scale


def test_loss_only_on_masked_positions():
    ids, plen = build_sft_row([5, 6, 7], [8, 9, 10, 11], eos_id=0, block_size=4)
    batch = collate_sft([(ids, plen), (ids[:6], plen)], pad_id=1)
    module = BlockDiffusionSFT("unused", block_size=4, init_tiny={"hidden_size": 32}, complementary_masks=True)
    module.lm = _StubLM(16, batch["response_mask"])
    loss, metrics = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
    masks, bs = module.lm.calls[0]
    assert bs == 4 and masks.shape == (2, 2, 8)
    # complementary copies: every response token (EOS and fill included) is a target exactly once
    assert torch.equal(masks.sum(1).bool(), batch["response_mask"])
    assert int(metrics["masked_tokens"]) == int(batch["response_mask"].sum())
    assert loss.item() < 1e-6 and metrics["masked_acc"].item() == 1.0  # targets = clean tokens at masked positions


@pytest.mark.parametrize("logit_shift", [False, True])
def test_windowed_logits_match_full_packing(tmp_path, logit_shift):
    """On SFT rows (prompts of different lengths) the per-row noisy windows give the logits of full-length noisy
    copies, computed here by hand."""
    from lrl.models import build_tiny_model
    from lrl.models.masks import dense_block_diffusion_mask, segment_ids

    dm = SFTDataModule(str(tmp_path / "new"), block_size=8, task_kwargs={"num_train": 6, "num_eval": 2})
    dm.setup("fit")
    batch = collate_sft(dm.train_rows, dm.pad_id)
    lm = build_tiny_model(dm.tokenizer, hidden_size=32, num_layers=1, block_size=8, logit_shift=logit_shift,
                          max_position_embeddings=160)
    masks, _ = sample_noisy_masks(batch["response_mask"], 8, complementary=True,
                                  generator=torch.Generator().manual_seed(0))
    ids, lengths = batch["input_ids"], batch["lengths"]
    assert len(set(batch["prompt_lengths"].tolist())) > 1  # the windows really differ by row
    with torch.no_grad():
        fast = lm.diffusion_logits(ids, masks, lengths, 8)
        b, k, length = masks.shape
        noisy = torch.where(masks, torch.tensor(lm.bd.mask_token_id), ids.unsqueeze(1))
        packed = torch.cat([noisy.reshape(b, k * length), ids], dim=1)
        copy, block, valid, pos = segment_ids(lengths, length, k, 8)
        hidden = lm._decoder(packed, pos, dense_block_diffusion_mask(copy, block, valid))
        b_idx, k_idx, l_idx = masks.nonzero(as_tuple=True)
        src = k_idx * length + l_idx
        if logit_shift:
            src = torch.where(l_idx % 8 != 0, src - 1, k * length + l_idx - 1)
        ref = lm.logits(hidden[b_idx, src])
    assert fast.shape == ref.shape == (int(masks.sum()), len(dm.tokenizer))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_loss_weighting():
    logits = torch.zeros(3, 5)
    targets = torch.tensor([0, 1, 2])
    ratios = torch.tensor([0.5, 0.25, 1.0])
    assert masked_diffusion_loss(logits, targets, ratios).item() == pytest.approx(math.log(5))
    weighted = masked_diffusion_loss(logits, targets, ratios, weighting="inverse_ratio", num_response_tokens=7)
    assert weighted.item() == pytest.approx(math.log(5) * (2 + 4 + 1) / 7)
    assert masked_diffusion_loss(torch.zeros(0, 5, requires_grad=True), targets[:0], ratios[:0]).item() == 0.0


def test_module_validation():
    with pytest.raises(ValueError, match="init_tiny: unknown keys \\['hidden'\\]"):
        BlockDiffusionSFT("x", block_size=4, init_tiny={"hidden": 8})
    with pytest.raises(ValueError, match="block_size is required with init_tiny"):
        BlockDiffusionSFT("x", init_tiny={"hidden_size": 32})
    with pytest.raises(ValueError, match="loss_weighting"):
        BlockDiffusionSFT("x", loss_weighting="sum")
    with pytest.raises(ValueError, match="lr"):
        BlockDiffusionSFT("x", lr=0.0)


# ------------------------------------------------------------------ training
def test_loss_decreases(tmp_path):
    torch.manual_seed(0)
    dm = SFTDataModule(str(tmp_path / "new"), block_size=8, task_kwargs={"num_train": 16, "num_eval": 4})
    dm.setup("fit")
    batch = collate_sft(dm.train_rows, dm.pad_id)
    module = BlockDiffusionSFT(str(tmp_path / "new"), block_size=8,
                               init_tiny={"hidden_size": 64, "num_layers": 1, "max_position_embeddings": 160})
    module.build(dm.tokenizer)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss, _ = module.diffusion_loss(batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


def test_cli_fit_smoke(tmp_path, monkeypatch):
    from lrl.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["lrl"])  # LightningCLI warns when args= and pytest's argv are both given
    from lrl.models import load_checkpoint

    export = tmp_path / "base"
    cli = cli_main([
        "fit", "--config", "configs/sft_tiny.yaml",
        f"--checkpoint={export}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.task_kwargs={num_train: 64, num_eval: 8}", "--data.batch_size=8",
        "--data.val_size=2", "--model.val_max_new_tokens=16",
    ])
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert "val/accuracy" in cli.trainer.callback_metrics and "val/tpf" in cli.trainer.callback_metrics
    lm, tok = load_checkpoint(export)
    assert lm.bd.block_size == 8 and lm.bd.mask_token_id == tok.mask_token_id
    assert tok.get_vocab() == cli.datamodule.tokenizer.get_vocab()
    trained = cli.model.lm.state_dict()
    for name, tensor in lm.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_continue_from_checkpoint_at_another_block_size():
    """The block-16 curriculum: SFT resumes the committed block-8 base with a new block size, in train mode."""
    module = BlockDiffusionSFT("outputs/base/sft_tiny", block_size=16, export_dir="unused")
    lm = module.build()
    assert lm.bd.block_size == 16 and module.block_size == 16
    assert all(m.training for m in lm.modules())  # from_pretrained returns eval mode
