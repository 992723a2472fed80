"""Supervised fine-tuning with the masked block-diffusion objective (spec §1.2): builds the demo's base model.

A training row is ``prompt + target response + EOS`` (right-padded; see `datamodules.sft.SFTDataModule`). Blocks
are aligned to absolute position 0 of the row, exactly as the rollout engine aligns them. For every (row, block)
a mask ratio t ~ U(ε, 1) is drawn and each RESPONSE position of the block is masked independently with
probability t; prompt positions are never masked. The model sees ``[x_t | x_0]`` under the block-diffusion
attention mask (`BlockDiffusionLM.diffusion_logits`) and is trained with cross-entropy on the masked positions only.
Unlike the released LightningRL/SDAR training code, EOS is a target: a model that never learns to stop cannot be
rewarded for short, fast answers.

Options:
    * ``complementary_masks`` packs a second noisy copy whose mask is the complement (within the response) of the
      first, so every response token is a target in every step for 1.5× the sequence length of one copy.
    * ``loss_weighting="mean"`` (default): plain mean over all masked tokens of the batch. ``"inverse_ratio"``:
      MDLM's ELBO weighting, each masked token weighted by 1/t of its block, normalised by the number of response
      tokens (higher variance; with complementary masks the second copy's ratio is 1 − t).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lrl.models import BlockDiffusionLM, build_tiny_model, load_checkpoint, save_checkpoint

LossWeighting = Literal["mean", "inverse_ratio"]
Schedule = Literal["cosine", "constant"]
# build_tiny_model kwargs that init_tiny may set (block_size comes from the shared top-level argument).
_TINY_KEYS = frozenset(inspect.signature(build_tiny_model).parameters) - {"tokenizer", "block_size"}


# ---------------------------------------------------------------------------------------------- pure functions
def sample_noisy_masks(
    response_mask: torch.Tensor,
    block_size: int,
    *,
    min_mask_ratio: float = 1e-3,
    complementary: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the noisy copies of a batch: per (row, block) ratio t ~ U(ε, 1), response tokens masked w.p. t.

    Args:
        response_mask: (B, L) bool, True at positions that are targets (response + EOS); False at prompt and
            padding positions, which are never masked.
        block_size: blocks are ``[j·b, (j+1)·b)`` in absolute row positions (the rollout engine's alignment).
        min_mask_ratio: ε, the smallest mask ratio.
        complementary: add a second copy masking exactly the response positions the first copy keeps.
        generator: random source (None: torch's global RNG, seeded by Lightning's ``seed_everything``).
    Returns:
        masks: (B, K, L) bool with K = 2 if complementary else 1.
        ratios: (B, K, L) float, the mask ratio of each position's block in each copy (1 − t for the complement).
    """
    if response_mask.dim() != 2 or response_mask.dtype != torch.bool:
        raise ValueError(
            f"response_mask must be a (B, L) bool tensor, got {response_mask.dtype} {tuple(response_mask.shape)}"
        )
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    if not 0.0 <= min_mask_ratio < 1.0:
        raise ValueError(f"min_mask_ratio must be in [0, 1), got {min_mask_ratio}")
    b, length = response_mask.shape
    device = response_mask.device
    num_blocks = (length + block_size - 1) // block_size
    t = min_mask_ratio + (1.0 - min_mask_ratio) * torch.rand(b, num_blocks, generator=generator, device=device)
    block_of = torch.arange(length, device=device) // block_size
    ratio = t[:, block_of]  # (B, L): every position carries its block's ratio
    u = torch.rand(b, length, generator=generator, device=device)
    first = response_mask & (u < ratio)
    if not complementary:
        return first[:, None], ratio[:, None]
    second = response_mask & ~first
    return torch.stack([first, second], 1), torch.stack([ratio, 1.0 - ratio], 1)


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratios: torch.Tensor,
    *,
    weighting: LossWeighting = "mean",
    num_response_tokens: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the masked positions.

    Args:
        logits: (M, V) logits of the M masked positions.
        targets: (M,) clean tokens at those positions.
        ratios: (M,) mask ratio of each position's block (used by ``inverse_ratio``).
        weighting: ``mean`` (token mean over masked positions) or ``inverse_ratio`` (Σ CE/t ÷ response tokens).
        num_response_tokens: normaliser of ``inverse_ratio`` (response tokens × noisy copies of the batch).
    """
    if logits.shape[0] == 0:  # no masked token at all (empty responses): a zero that keeps the graph
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    if weighting == "mean":
        return ce.mean()
    if weighting == "inverse_ratio":
        if not num_response_tokens:
            raise ValueError("inverse_ratio weighting needs num_response_tokens > 0")
        return (ce / ratios.clamp(min=1e-6)).sum() / num_response_tokens
    raise ValueError(f"loss_weighting must be 'mean' or 'inverse_ratio', got {weighting!r}")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def score_completions(task, texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
    """The task's verifier; exact match of the last ``\\boxed{}`` when the verifier package is not installed."""
    try:
        return [float(s) for s in task.score(list(texts), list(records))]
    except ImportError:  # lrl.rewards / math-verify missing: synthetic answers are integers, exact match is exact
        return [float(_last_boxed(t) == task.ground_truth(r)) for t, r in zip(texts, records)]


# ---------------------------------------------------------------------------------------------- module
class BlockDiffusionSFT(LightningModule):
    """Masked block-diffusion SFT of a block-diffusion LM (spec §1.2), exporting an HF checkpoint at the end of fit.

    The network is loaded from ``checkpoint`` or, with ``init_tiny``, built from scratch (random tiny Qwen3 with the
    datamodule's tokenizer: the task's character tokenizer when ``checkpoint`` does not exist yet). Model building
    happens in ``setup`` (it needs the datamodule's tokenizer); call `build` directly outside a Trainer.

    Args:
        checkpoint: HF checkpoint directory to fine-tune. With ``init_tiny`` it is the export destination instead
            (the trained model and tokenizer are saved there at the end of fit).
        block_size: training block size (default: the checkpoint's); required with ``init_tiny``.
        mask_token_id: override of the checkpoint's mask token id (must equal the tokenizer's with ``init_tiny``).
        init_tiny: ``build_tiny_model`` keyword arguments (hidden_size, num_layers, num_heads, num_kv_heads,
            intermediate_size, max_position_embeddings, seed, …) to train a fresh random model instead of loading.
        export_dir: where to save the trained HF checkpoint (default: ``checkpoint`` with ``init_tiny``, else
            nothing is exported besides Lightning's own checkpoints).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrix weights (norms and other 1-D parameters are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        schedule: ``cosine`` (decay to ``min_lr_ratio`` · lr at the last step) or ``constant`` after warmup.
        min_lr_ratio: final learning rate of the cosine schedule as a fraction of ``lr``.
        min_mask_ratio: ε of t ~ U(ε, 1), the per-block mask ratio.
        complementary_masks: add a second noisy copy with the complementary mask (every token trained each step).
        loss_weighting: ``mean`` (token mean over masked positions) or ``inverse_ratio`` (MDLM 1/t weighting).
        val_threshold: confidence threshold of the greedy validation decode (``low_confidence_dynamic``).
        val_max_new_tokens: generation budget of the validation decode.
    """

    def __init__(
        self,
        checkpoint: str,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        *,
        init_tiny: dict[str, Any] | None = None,
        export_dir: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.1,
        min_mask_ratio: float = 1e-3,
        complementary_masks: bool = True,
        loss_weighting: LossWeighting = "mean",
        val_threshold: float = 0.9,
        val_max_new_tokens: int = 64,
    ):
        super().__init__()
        if not checkpoint:
            raise ValueError("checkpoint must be a non-empty path")
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if init_tiny is not None:
            unknown = sorted(set(init_tiny) - _TINY_KEYS)
            if unknown:
                raise ValueError(
                    f"init_tiny: unknown keys {unknown}; allowed: {sorted(_TINY_KEYS)} "
                    "(set block_size at the top level)"
                )
            if block_size is None:
                raise ValueError("block_size is required with init_tiny (model and datamodule must share it)")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= min_mask_ratio < 1.0:
            raise ValueError(f"min_mask_ratio must be in [0, 1), got {min_mask_ratio}")
        if loss_weighting not in ("mean", "inverse_ratio"):
            raise ValueError(f"loss_weighting must be 'mean' or 'inverse_ratio', got {loss_weighting!r}")
        if not 0.0 <= val_threshold <= 1.0:
            raise ValueError(f"val_threshold must be in [0, 1], got {val_threshold}")
        if val_max_new_tokens <= 0:
            raise ValueError(f"val_max_new_tokens must be > 0, got {val_max_new_tokens}")
        self.save_hyperparameters()
        self.checkpoint = checkpoint
        self.init_tiny = dict(init_tiny) if init_tiny is not None else None
        self.export_dir = export_dir if export_dir is not None else (checkpoint if init_tiny is not None else None)
        self._block_size = block_size
        self._mask_token_id = mask_token_id
        self.lm: BlockDiffusionLM | None = None
        self.tokenizer = None
        self.task = None
        self._val: dict[str, float] = {}

    # ------------------------------------------------------------------ model
    @property
    def block_size(self) -> int:
        if self._block_size is not None:
            return self._block_size
        if self.lm is None:
            raise RuntimeError("block_size is unknown before the model is built (call build() or fit)")
        return self.lm.bd.block_size

    def build(self, tokenizer=None) -> BlockDiffusionLM:
        """Load ``checkpoint`` or build the ``init_tiny`` model (with ``tokenizer``); idempotent."""
        if self.lm is not None:
            return self.lm
        if self.init_tiny is not None:
            if tokenizer is None:
                raise ValueError("init_tiny needs a tokenizer: use SFTDataModule or call build(tokenizer)")
            if self._mask_token_id is not None and self._mask_token_id != tokenizer.mask_token_id:
                raise ValueError(
                    f"mask_token_id={self._mask_token_id} but the tokenizer's mask token has id "
                    f"{tokenizer.mask_token_id}"
                )
            lm = build_tiny_model(tokenizer, block_size=self._block_size, **self.init_tiny)
        else:
            lm, loaded_tok = load_checkpoint(self.checkpoint, mask_token_id=self._mask_token_id,
                                             block_size=self._block_size)
            if tokenizer is not None and len(tokenizer) != len(loaded_tok):
                raise ValueError(
                    f"the datamodule's tokenizer has {len(tokenizer)} tokens but {self.checkpoint}'s has "
                    f"{len(loaded_tok)}"
                )
            tokenizer = tokenizer or loaded_tok
            lm.train()  # from_pretrained returns eval mode; dropout (if configured) must be active in SFT
        self.lm, self.tokenizer = lm, tokenizer
        n = sum(p.numel() for p in lm.parameters())
        rank_zero_info(f"BlockDiffusionSFT: {n / 1e6:.2f}M parameters, block size {self.block_size}")
        return lm

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.build(getattr(dm, "tokenizer", None))
        if dm is not None and getattr(dm, "block_size", None) is not None and dm.block_size != self.block_size:
            raise ValueError(f"datamodule block_size={dm.block_size} differs from the model's {self.block_size}")
        self.task = getattr(dm, "task", None)

    # ------------------------------------------------------------------ training
    def diffusion_loss(self, batch: Mapping[str, torch.Tensor],
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of one batch ``{input_ids (B, L), lengths (B,), response_mask (B, L)}``."""
        lm = self.build()
        ids, lengths, resp = batch["input_ids"], batch["lengths"], batch["response_mask"]
        masks, ratios = sample_noisy_masks(resp, self.block_size, min_mask_ratio=self.hparams.min_mask_ratio,
                                           complementary=self.hparams.complementary_masks, generator=generator)
        # the noisy copies hold only each row's response blocks (BlockDiffusionLM.diffusion_hidden)
        logits = lm.diffusion_logits(ids, masks, lengths, self.block_size)
        b_idx, k_idx, l_idx = masks.nonzero(as_tuple=True)  # the order of diffusion_logits' rows
        targets = ids[b_idx, l_idx]
        loss = masked_diffusion_loss(logits, targets, ratios[b_idx, k_idx, l_idx],
                                     weighting=self.hparams.loss_weighting,
                                     num_response_tokens=int(resp.sum()) * masks.shape[1])
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).float().mean() if targets.numel() else loss.new_zeros(())
        return loss, {"masked_acc": acc, "masked_tokens": torch.tensor(float(targets.numel()))}

    def training_step(self, batch, batch_idx):
        loss, m = self.diffusion_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/masked_acc", m["masked_acc"], prog_bar=True, batch_size=bs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=bs)
        return loss

    def configure_optimizers(self):
        lm = self.build()
        decay = [p for p in lm.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in lm.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas),
        )
        total = self._total_steps()
        warm, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if self.hparams.schedule == "constant" or total is None or total <= warm:
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int | None:
        if self._trainer is None:
            return None
        total = self.trainer.estimated_stepping_batches
        return int(total) if math.isfinite(total) else None

    # ------------------------------------------------------------------ validation: greedy decode at val_threshold
    def on_validation_epoch_start(self) -> None:
        self._val = {"correct": 0.0, "count": 0.0, "tokens": 0.0, "forwards": 0.0}

    @torch.no_grad()
    def validation_step(self, batch, batch_idx):
        """``batch = {"prompts": [str], "records": [dict]}``; decodes greedily and scores with the task."""
        if self.task is None:
            raise RuntimeError("validation needs a task: use SFTDataModule (it provides .task)")
        from lrl.rollout import NativeEngine, SamplingParams

        sp = SamplingParams(block_size=self.block_size, threshold=self.hparams.val_threshold, greedy=True,
                            max_new_tokens=self.hparams.val_max_new_tokens,
                            stop_token_ids=(self.tokenizer.eos_token_id,))
        out = NativeEngine(self.lm, self.tokenizer).generate(batch["prompts"], sp)
        scores = score_completions(self.task, out.texts, batch["records"])
        self._val["correct"] += sum(scores)
        self._val["count"] += len(scores)
        self._val["tokens"] += float(out.response_lengths.sum())
        self._val["forwards"] += float(out.num_forwards.sum())

    def on_validation_epoch_end(self) -> None:
        v = self._val
        if not v.get("count"):
            return
        self.log("val/accuracy", v["correct"] / v["count"], prog_bar=True, sync_dist=True)
        self.log("val/tpf", v["tokens"] / max(v["forwards"], 1.0), prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ export
    def on_train_end(self) -> None:
        if self.export_dir is not None:
            self.export(self.export_dir)

    @rank_zero_only
    def export(self, path: str | Path) -> None:
        """Save the current weights and tokenizer as an HF checkpoint directory (atomic)."""
        save_checkpoint(self.build(), path, tokenizer=self.tokenizer)
        rank_zero_info(f"BlockDiffusionSFT: exported the trained model to {path}")
