"""Data for block-diffusion SFT: rows ``prompt + target response + EOS`` from a task's train split.

Tokenizer (one source for model and data): the tokenizer saved in ``checkpoint`` when that directory exists;
otherwise, or with ``tokenizer_from="task_chars"`` (a model trained from scratch with
``BlockDiffusionSFT(init_tiny=...)``), the deterministic character tokenizer
``build_char_tokenizer(task.char_set() + extra_chars)``. `lrl.sft.BlockDiffusionSFT` builds its
from-scratch model with THIS tokenizer (it reads ``trainer.datamodule.tokenizer``), so ids always agree.

Rows: prompt ids + target ids + [EOS], then (``eos_fill_block``) EOS repeated up to the end of EOS's block, blocks
aligned to absolute position 0 as in the rollout engine. The fill teaches the model that a finished block stays
finished, so the last block of a decode does not spend forwards on junk after the stop token; the fill is part of
the response (a target), never of the padding.

Batches: ``{"input_ids" (B, L) right-padded with the pad id, "lengths" (B,), "response_mask" (B, L) bool,
"prompt_lengths" (B,)}`` with L the longest row of the batch. Validation batches are
``{"prompts": [str], "records": [dict]}`` from the task's eval split (decoded by the module).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lrl.models import build_char_tokenizer, load_tokenizer
from lrl.models.config import SDAR_DEFAULT_BLOCK_SIZE
from lrl.models.loading import read_config
from lrl.tasks import get_task


def build_sft_row(prompt_ids: Sequence[int], target_ids: Sequence[int], eos_id: int, block_size: int | None = None,
                  ) -> tuple[list[int], int]:
    """``(ids, prompt_length)`` of one row; with ``block_size``, EOS fills the rest of EOS's block."""
    ids = list(prompt_ids) + list(target_ids) + [eos_id]
    if block_size:
        ids += [eos_id] * (-len(ids) % block_size)
    return ids, len(prompt_ids)


def collate_sft(rows: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, prompt_length)`` rows into a training batch (see the module docstring)."""
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    plen = torch.tensor([p for _, p in rows], dtype=torch.long)
    width = int(lengths.max())
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    pos = torch.arange(width)[None]
    response_mask = (pos >= plen[:, None]) & (pos < lengths[:, None])
    return {"input_ids": input_ids, "lengths": lengths, "response_mask": response_mask, "prompt_lengths": plen}


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of rows of similar length (less padding): shuffle, sort chunks of ``group`` batches by
    length, cut them into batches, shuffle the batch order. Deterministic given ``generator``'s seed."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, group: int = 50):
        self.lengths, self.batch_size, self.generator, self.group = list(lengths), batch_size, generator, group

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        chunk, bs = self.batch_size * self.group, self.batch_size
        batches = []
        for i in range(0, len(perm), chunk):
            part = sorted(perm[i : i + chunk], key=self.lengths.__getitem__)
            batches += [part[j : j + bs] for j in range(0, len(part), bs)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]


def _collate_records(items: list[dict[str, Any]]) -> dict[str, list]:
    return {"prompts": [it["prompt"] for it in items], "records": [it["record"] for it in items]}


class SFTDataModule(LightningDataModule):
    """Task records as block-diffusion SFT rows (train) and held-out prompts to decode (validation).

    Args:
        checkpoint: model directory; its tokenizer is used when it exists, else the task's character tokenizer.
        block_size: diffusion block size (default: the checkpoint's ``block_size``, else SDAR's 4); only the EOS
            fill of the last block depends on it.
        mask_token_id: accepted for the CLI link; the module applies the masks, so it is only checked against the
            tokenizer when given.
        task: registered task name (``lrl.tasks.get_task``).
        task_kwargs: constructor arguments of the task (e.g. ``num_train`` for more SFT problems).
        exclude_eval_of: task_kwargs of other configurations of the same task whose eval split must never be
            trained on (``[{}]``: the task's default configuration, e.g. the one the RL demo evaluates on).
        tokenizer_from: ``checkpoint`` (its saved tokenizer), ``task_chars`` (the character tokenizer of the task's
            char set, for models trained from scratch: a stale export at ``checkpoint`` is then ignored) or ``auto``
            (the checkpoint's when ``checkpoint/config.json`` exists, else the task's characters).
        extra_chars: characters added to the task's char set for the from-scratch character tokenizer.
        batch_size: training rows per batch.
        val_size: held-out eval prompts decoded per validation (the first ``val_size`` of the eval split; 0: none).
        val_batch_size: prompts per validation batch (decoded together by the rollout engine).
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        max_length: rows longer than this many tokens are dropped (with a warning).
        eos_fill_block: fill the rest of EOS's block with EOS targets (see the module docstring).
        group_by_length: batch rows of similar length together (`LengthGroupedBatches`; single process only).
    """

    def __init__(
        self,
        checkpoint: str,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        *,
        task: str = "synthetic",
        task_kwargs: dict[str, Any] | None = None,
        exclude_eval_of: list[dict[str, Any]] | None = None,
        tokenizer_from: Literal["auto", "checkpoint", "task_chars"] = "auto",
        extra_chars: str = "",
        batch_size: int = 64,
        val_size: int = 64,
        val_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        max_length: int = 512,
        eos_fill_block: bool = True,
        group_by_length: bool = True,
    ):
        super().__init__()
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        for name, value, low in (("batch_size", batch_size, 1), ("val_size", val_size, 0),
                                 ("val_batch_size", val_batch_size, 1), ("num_workers", num_workers, 0),
                                 ("max_length", max_length, 2)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.save_hyperparameters()
        self.checkpoint = checkpoint
        self.task = get_task(task, **(task_kwargs or {}))
        self._exclude = [get_task(task, **kw) for kw in (exclude_eval_of or [])]
        if tokenizer_from not in ("auto", "checkpoint", "task_chars"):
            raise ValueError(f"tokenizer_from must be 'auto', 'checkpoint' or 'task_chars', got {tokenizer_from!r}")
        ckpt = Path(checkpoint)
        exists = (ckpt / "config.json").is_file()
        if tokenizer_from == "checkpoint" and not exists:
            raise ValueError(f"tokenizer_from='checkpoint' but {ckpt / 'config.json'} does not exist")
        self.from_checkpoint = exists and tokenizer_from != "task_chars"
        if self.from_checkpoint:
            self.tokenizer = load_tokenizer(ckpt)
            cfg_block = read_config(ckpt).get("block_size")
        else:
            if not hasattr(self.task, "char_set"):
                raise ValueError(
                    f"task {task!r} has no char_set() to build a character tokenizer from (and checkpoint "
                    f"{checkpoint!r} is not used for the tokenizer: tokenizer_from={tokenizer_from!r})"
                )
            self.tokenizer = build_char_tokenizer(self.task.char_set() + extra_chars)
            cfg_block = None
        self.block_size = int(block_size or cfg_block or SDAR_DEFAULT_BLOCK_SIZE)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {checkpoint!r} has no eos token (it is a training target)")
        if mask_token_id is not None and self.tokenizer.mask_token_id not in (None, mask_token_id):
            raise ValueError(f"mask_token_id={mask_token_id} but the tokenizer's mask token has id "
                             f"{self.tokenizer.mask_token_id}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.train_rows: list[tuple[list[int], int]] | None = None
        self.val_items: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ rows
    def encode_records(self, records: Sequence[dict[str, Any]]) -> list[tuple[list[int], int]]:
        """SFT rows of ``records``; rows over ``max_length`` are dropped; unknown characters are an error."""
        tok = self.tokenizer
        prompts = tok([self.task.prompt(r) for r in records], add_special_tokens=False).input_ids
        targets = tok([self.task.target_response(r) for r in records], add_special_tokens=False).input_ids
        fill = self.block_size if self.hparams.eos_fill_block else None
        unk = tok.unk_token_id
        rows, dropped = [], 0
        for i, (p, t) in enumerate(zip(prompts, targets)):
            if unk is not None and (unk in p or unk in t):
                text = self.task.prompt(records[i]) + self.task.target_response(records[i])
                raise ValueError(
                    f"record {i} of task {self.task.name!r} has characters the tokenizer does not know "
                    f"(add them with extra_chars): {text!r}"
                )
            row = build_sft_row(p, t, tok.eos_token_id, fill)
            if len(row[0]) > self.hparams.max_length:
                dropped += 1
                continue
            rows.append(row)
        if dropped:
            rank_zero_warn(f"SFTDataModule: dropped {dropped} of {len(records)} rows longer than "
                           f"max_length={self.hparams.max_length}")
        return rows

    def train_records(self) -> list[dict[str, Any]]:
        """The task's train split minus the eval questions of ``exclude_eval_of`` configurations."""
        records = self.task.load("train")
        banned = {r["question"] for t in self._exclude for r in t.load("eval")}
        return [r for r in records if r["question"] not in banned] if banned else records

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.train_rows is None:
            self.train_rows = self.encode_records(self.train_records())
            if not self.train_rows:
                raise ValueError(f"task {self.task.name!r} gave no training rows (check task_kwargs and max_length)")
        if stage in ("fit", "validate") and self.val_items is None:
            recs = self.task.load("eval")[: self.hparams.val_size]
            self.val_items = [{"prompt": self.task.prompt(r), "record": r} for r in recs]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.hparams.seed)
        common = {"num_workers": self.hparams.num_workers, "collate_fn": partial(collate_sft, pad_id=self.pad_id),
                  "persistent_workers": self.hparams.num_workers > 0}
        # several processes: a plain shuffle, so that Lightning can shard it with its DistributedSampler
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if self.hparams.group_by_length and not distributed:
            sampler = LengthGroupedBatches([len(ids) for ids, _ in self.train_rows], self.hparams.batch_size, gen)
            return DataLoader(self.train_rows, batch_sampler=sampler, **common)
        return DataLoader(self.train_rows, batch_size=self.hparams.batch_size, shuffle=True, generator=gen, **common)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_items:
            return []
        return DataLoader(self.val_items, batch_size=self.hparams.val_batch_size, shuffle=False,
                          collate_fn=_collate_records)
