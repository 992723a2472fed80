"""`LightningRLModule`: the GRPO / LightningRL policy update as a LightningModule (spec §4, §9).

One training step consumes one `RolloutBatch` (rewards, filters and advantages already applied by the
datamodule): it computes old log-probs with the rollout weights (= the current policy: rollouts are on-policy),
reference log-probs if β > 0, then runs ``ppo_epochs`` × ``minibatches`` optimizer steps of
L = L_policy + β·KL + μ·NLL (`lrl.algorithms.losses`, knobs: ``loss``, a `LossConfig`), each minibatch split
into micro-batches whose contributions are normalised by the whole minibatch's counts (across ranks), so the
reduction never depends on the micro-batch size. Manual optimization: several optimizer steps per batch, as in
Lightning's PPO template. The step itself is `lrl.module_step.RLStep`; dUltra's planner terms are
`lrl.module_planner.PlannerTraining`; this file holds the arguments, the models, the optimizer and evaluation.

The training step pulls its batch itself (``training_step(dataloader_iter)``): Lightning then does not prefetch
the next batch, so the next rollout starts only after this step's optimizer steps (strictly on-policy, and the
datamodule's cursor in a checkpoint is exact).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy

from lrl.algorithms.losses import LossConfig
from lrl.evaluation.config import EvalConfig, as_eval_config
from lrl.models import BlockDiffusionLM, load_checkpoint
from lrl.models.lora import LoraSettings, lora_settings
from lrl.models.sharding import full_state_dict, gathered, is_sharded, submodule_prefix, unwrap, wrap_fsdp
from lrl.module_lora import LoraTraining
from lrl.module_planner import PlannerTraining
from lrl.module_step import NonFiniteLossError, RLStep
from lrl.rollout.types import RolloutBatch

__all__ = ["LightningRLModule", "NonFiniteLossError"]


class LightningRLModule(LoraTraining, RLStep, PlannerTraining, LightningModule):
    """Policy (+ frozen reference) and the LightningRL/GRPO update.

    Args:
        checkpoint: HF checkpoint directory of the initial policy (linked from the top-level ``--checkpoint``).
        block_size: rollout block size; the trajectory estimator trains with the same block size (linked).
        mask_token_id: override of the checkpoint's mask token id (linked).
        estimator: ``trajectory`` (paper Eq. 3/8/9, replays the step map), ``single_pass`` (released code:
            all response tokens masked at once with the model's configured block size) or ``masked_states``
            (each token scored under every state of its block in which it was still masked, averaged).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        adam_eps: AdamW epsilon.
        warmup_steps: linear warmup (optimizer steps) of a constant schedule, applied once for the whole run.
        reset_optimizer_each_step: re-create optimizer moments and restart warmup at every RL step (reproduces the
            released code, spec §4.5; off in the paper profile).
        max_grad_norm: gradient clipping norm (0 disables).
        loss: the loss knobs (`lrl.algorithms.losses.LossConfig`): clip ε / ε_high, KL β and estimator, NLL μ and
            which responses it trains on, the three reductions, TIS cap; set as ``loss: {kl_beta: 0.0, ...}``,
            keys left out keep their defaults (the paper's).
        ppo_epochs: passes over each rollout batch.
        minibatches: optimizer steps per pass (the batch is split into this many minibatches of whole groups'
            responses in rollout order).
        micro_batch_size: responses per forward/backward (memory knob; does not change the loss).
        max_copies: trajectory rounds packed per training row.
        rows_per_forward: packed rows per forward inside a micro-batch (rows are sorted by shape first, so small
            values waste less padding).
        gradient_checkpointing: trade compute for memory in the decoder.
        attention: training attention: ``sdpa`` (dense boolean mask, any device) or ``flex`` (block-sparse
            flex_attention BlockMask on CUDA; CPU falls back to sdpa because flex has no CPU backward).
        max_skipped_steps: stop with an error after this many optimizer steps skipped for a non-finite loss.
        max_rl_steps: stop after this many RL steps (rollout batches). Lightning's ``trainer.max_steps`` counts
            optimizer steps, which is ``minibatches × ppo_epochs`` per RL step and 0 for a step whose groups were
            all filtered out, so the run length is set here.
        eval: the validation / Pareto sweep (`lrl.evaluation.config.EvalConfig`: ``thresholds``,
            ``max_new_tokens``, ``static_anchor``, ``planner_thresholds``, and the evaluation engine's ``max_rows``,
            ``kv_cache_gb``, ``transient_gb``, which default to the rollout's).
        planner_head: dUltra (spec §8.3): `lrl.models.planner.PlannerConfig` fields (without hidden_size) of a
            fresh planner head, created when the checkpoint has none (a checkpoint's own head is always loaded).
        planner_lr: learning rate of the planner head (None: ``lr``).
        freeze_backbone: train the planner head only (planner-only RL); needs a planner head.
        planner_ratio: how planner rollouts (``data.remasking_strategy: planner``) are trained (spec §8.3,
            `lrl.algorithms.planner_objective`): ``separate`` adds a PPO term over each step's decision
            log-probs to the per-token loss; ``joint`` uses one ratio per step whose log-prob is Σ decisions +
            Σ tokens of the step, with this loss's clip, KL and reductions over steps (needs a planner head and
            the trajectory estimator; one packed forward per micro-batch instead of two).
        reference_offload: keep the frozen reference on the CPU between its passes (on a GPU it then costs device
            memory only during the reference log-prob pass). The reference is held in the compute dtype (bf16 under
            ``bf16-mixed`` / ``bf16-true``), never as a second float32 copy. Nothing to do with ``lora`` (the
            reference is then the policy itself with its adapters disabled).
        lora: LoRA adapters on the policy (`lrl.models.lora.LoraSettings`: rank, alpha, dropout,
            target_modules); None (default) trains every weight. With LoRA the base is frozen in the compute
            dtype, the reference is the base (no second model), checkpoints hold the adapters and their AdamW
            states only, and ``scripts/export_policy.py`` merges them (docs/lora.md).
    """

    def __init__(
        self,
        checkpoint: str,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        *,
        estimator: Literal["trajectory", "single_pass", "masked_states"] = "trajectory",
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        warmup_steps: int = 10,
        reset_optimizer_each_step: bool = False,
        max_grad_norm: float = 1.0,
        loss: LossConfig = LossConfig(),
        ppo_epochs: int = 1,
        minibatches: int = 1,
        micro_batch_size: int = 16,
        max_copies: int = 8,
        rows_per_forward: int = 8,
        gradient_checkpointing: bool = False,
        attention: Literal["sdpa", "flex"] = "sdpa",
        max_skipped_steps: int = 3,
        max_rl_steps: int | None = None,
        eval: EvalConfig = EvalConfig(),
        planner_head: dict | None = None,
        planner_lr: float | None = None,
        freeze_backbone: bool = False,
        planner_ratio: Literal["separate", "joint"] = "separate",
        reference_offload: bool = True,
        lora: LoraSettings | None = None,
    ):
        super().__init__()
        for name, value in (
            ("lr", lr),
            ("ppo_epochs", ppo_epochs),
            ("minibatches", minibatches),
            ("micro_batch_size", micro_batch_size),
            ("max_copies", max_copies),
            ("rows_per_forward", rows_per_forward),
        ):
            if value <= 0:
                raise ValueError(f"model.{name} must be > 0, got {value}")
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        # a checkpoint's saved hyperparameters hold the group as a mapping (plain values: see below)
        loss = loss if isinstance(loss, LossConfig) else LossConfig(**loss)
        if loss.tis_cap is not None and estimator != "trajectory":  # π_old must be scored in the sampling state
            raise ValueError(f"model.loss.tis_cap needs model.estimator=trajectory (got {estimator!r}): only it "
                             "scores each token in the state that sampled it, like the rollout's log-probs")
        self.eval_cfg = as_eval_config(eval)
        self.eval_cfg.check()
        if planner_ratio not in ("separate", "joint"):
            raise ValueError(f"model.planner_ratio must be 'separate' or 'joint', got {planner_ratio!r}")
        if planner_lr is not None and planner_lr <= 0:
            raise ValueError(f"model.planner_lr must be > 0 (or null: model.lr), got {planner_lr}")
        if max_rl_steps is not None and max_rl_steps < 1:
            raise ValueError(f"model.max_rl_steps must be >= 1, got {max_rl_steps}")
        lora = self._check_lora(lora_settings(lora), freeze_backbone)  # a plain dict (module_lora)
        self.save_hyperparameters()
        self.hparams["loss"] = asdict(loss)  # plain values in checkpoints and hparams.yaml
        self.hparams["eval"] = asdict(self.eval_cfg)
        self.hparams["lora"] = lora
        self.loss_config = loss
        self.automatic_optimization = False
        self.policy: BlockDiffusionLM | None = None
        self.tokenizer = None
        self._ref: list[BlockDiffusionLM] = []  # a list keeps the frozen ref out of state_dict and .to()
        self.skipped_steps = 0
        self.rl_step = 0  # the one RL-step counter (the data module and the generator's weight_version read it)
        self.padded_forwards = 0  # FSDP: dummy forwards run to match another rank's count (diagnostics)
        self.last_batch: RolloutBatch | None = None
        self.last_pareto = None

    # ------------------------------------------------------------------ model setup
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy, self.tokenizer = load_checkpoint(hp.checkpoint, mask_token_id=hp.mask_token_id,
                                                      attention=hp.attention)
        self._setup_planner()
        self.policy.train()  # from_pretrained returns eval mode; Lightning warns when fit starts with eval modules
        if hp.gradient_checkpointing:
            self.policy.model.gradient_checkpointing_enable()
        self._setup_lora()
        if self.loss_config.kl_beta > 0 and hp.lora is None:  # with LoRA the reference is the base (module_lora)
            ref = copy.deepcopy(self.policy).eval()  # on the CPU here: the policy reaches the device later
            ref.requires_grad_(False)
            dtype = self._compute_dtype()
            if dtype is not None:  # its passes run in this dtype anyway (autocast): no float32 copy (issue 28)
                ref.to(dtype)
            self._ref = [ref]
        self._maybe_shard()

    def _maybe_shard(self) -> None:
        """Under Lightning's FSDPStrategy, shard the policy here (decoder layers as units) instead of letting the
        strategy wrap the whole LightningModule: its root unit would stay in "forward" state for all of
        ``training_step``, and the manual backward passes inside it are then rejected. Training calls the wrapper
        (``BlockDiffusionLM.forward``); inference gathers the full parameters (`gathered`). The frozen reference
        stays a full, unsharded copy on each rank."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is None or not isinstance(strategy, FSDPStrategy) or is_sharded(self.policy):
            return
        if self.hparams.lora is not None:
            raise ValueError("model.init_args.lora runs without FSDP (one GPU or DDP: the frozen base is small "
                             "enough): drop trainer.strategy=fsdp or set model.init_args.lora=null")
        layers = {type(m) for m in self.policy.model.modules() if m.__class__.__name__.endswith("DecoderLayer")}
        if not layers:
            raise ValueError(f"FSDP: found no *DecoderLayer modules in {type(self.policy.model).__name__} to shard")
        device = strategy.root_device if strategy.root_device.type != "cpu" else torch.device("cpu")
        self.policy = wrap_fsdp(
            self.policy, layers, device=device, sharding_strategy=strategy.sharding_strategy,
            mixed_precision=strategy.mixed_precision_config, cpu_offload=strategy.cpu_offload,
        )

    def gathered_policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's full weights (HF names): gathered from the shards under FSDP (a collective: every rank must
        call), else the policy's own state dict."""
        if self.hparams.lora is not None:  # merged one tensor at a time (lrl.models.lora.MergedWeights)
            return self.merged_policy_state()
        if not is_sharded(self.policy):
            return self.policy.model.state_dict()
        return full_state_dict(self, prefix=submodule_prefix(self, self.policy.model))

    def _forward_sync_for(self, lm):
        """`response_logprobs`' ``sync_forwards`` for ``lm``: only a sharded model on several ranks needs it."""
        return self._sync_forwards if is_sharded(lm) and self.trainer.world_size > 1 else None

    def _sync_forwards(self, local: int) -> int:
        """The number of forward passes every rank runs: the maximum over ranks (collective)."""
        total = int(self.all_gather(torch.tensor(local, device=self.device)).max())
        self.padded_forwards += total - local
        return total

    def _compute_dtype(self) -> torch.dtype | None:
        """The dtype the trainer's precision computes in (None: the parameters' own)."""
        precision = str(getattr(self._trainer, "precision", "") if self._trainer is not None else "")
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return None

    @property
    def rollout_block_size(self) -> int:
        return self.hparams.block_size or self.policy.bd.block_size

    @property
    def reference(self) -> BlockDiffusionLM | None:
        if self.hparams.lora is not None:  # the base: `_reference_logprobs` disables the adapters (module_lora)
            return self.policy if self.loss_config.kl_beta > 0 else None
        if not self._ref:
            return None
        ref = self._ref[0]
        if ref.device != self.device:
            ref.to(self.device)
        return ref

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self._param_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.adam_eps,
                                weight_decay=hp.weight_decay)
        warm = hp.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / warm) if warm > 0 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # RolloutBatch holds ragged lists; tensors are moved where they are used

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lrl"] = {"skipped_steps": self.skipped_steps, "rl_step": self.rl_step}
        self._lora_save(checkpoint)  # LoRA: the adapters only (module_lora)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()  # weights are loaded into the policy right after this hook
        state = checkpoint.get("lrl", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rl_step = int(state.get("rl_step", 0))
        self._lora_load(checkpoint)

    def on_train_start(self) -> None:
        max_steps = self.hparams.max_rl_steps
        if max_steps is not None and self.rl_step >= max_steps:  # a resumed run that had already finished
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"lrl: the run is already at RL step {self.rl_step} of model.max_rl_steps={max_steps}; "
                           "nothing to train (raise model.init_args.max_rl_steps to continue)")
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx: int = 0):
        """``batch`` = {"task": Task, "records": [...], "stop_token_ids": ...}: a Pareto sweep of the current policy."""
        result = self.run_pareto(batch["task"], batch["records"], stop_token_ids=batch.get("stop_token_ids"))
        metrics = {"val/aup": result.aup}
        for p in result.points:
            key = "static" if p.threshold is None else p.setting if p.setting.startswith("planner") else \
                f"{p.threshold:g}"
            metrics[f"val/acc@{key}"] = p.accuracy
            metrics[f"val/tpf@{key}"] = p.tpf
            if p.sound_accuracy is not None:
                metrics[f"val/sound@{key}"] = p.sound_accuracy
        self.log_dict(metrics, batch_size=len(batch["records"]))
        self.last_pareto = result
        if self.trainer is not None and self.trainer.is_global_zero and self.trainer.state.fn in ("validate", "test"):
            self._write_pareto(result)
        return result

    def _write_pareto(self, result) -> None:
        """`lrl validate`: write pareto.json / pareto.png next to the logs and print the table."""
        from pathlib import Path

        from lrl.evaluation import write_pareto
        from lrl.evaluation.pareto import format_table, provenance

        out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "pareto"
        what = provenance(self.hparams.checkpoint, self.trainer.ckpt_path)  # --ckpt_path: the weights evaluated
        json_path, png_path = write_pareto(result, out, title=what["checkpoint"], extra=what)
        print(format_table(result))
        print(f"wrote {json_path} and {png_path}")

    test_step = validation_step

    @torch.no_grad()
    def run_pareto(self, task, records, *, thresholds=None, y_max: float | None = None, stop_token_ids=None):
        """The Pareto sweep (`run_pareto_sweep`) of the current policy over ``records``: split across the ranks and
        gathered (a collective with several ranks; every rank returns the whole result), decoded by an engine
        within the rollout's memory bounds (`_eval_engine_kwargs`), under autocast in the compute dtype on GPU."""
        from lrl.evaluation import run_pareto_sweep
        from lrl.evaluation.pareto import all_gather_object
        from lrl.models.generation import checkpoint_stop_ids
        from lrl.rollout.engine import NativeEngine

        ev = self.eval_cfg
        stop = checkpoint_stop_ids(self.hparams.checkpoint, self.tokenizer, stop_token_ids)
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        was_training = self.policy.training
        self.policy.eval()
        try:
            with gathered(self.policy), self._eval_autocast():  # sharded policy: the engine calls submodules directly
                engine = NativeEngine(unwrap(self.policy), self.tokenizer, **self._eval_engine_kwargs())
                return run_pareto_sweep(
                    engine,
                    task,
                    records,
                    thresholds=list(thresholds or ev.thresholds),
                    block_size=self.rollout_block_size,
                    max_new_tokens=ev.max_new_tokens,
                    stop_token_ids=stop,
                    static_anchor=ev.static_anchor,
                    y_max=y_max,
                    planner_thresholds=list(ev.planner_thresholds),
                    rank=rank,
                    world_size=world,
                    all_gather_object=all_gather_object if world > 1 else None,
                )
        finally:
            self.policy.train(was_training)

    def _eval_engine_kwargs(self) -> dict:
        """The evaluation engine's bounds (`EvalConfig.engine_bounds`: the rollout's unless ``eval`` sets them)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return self.eval_cfg.engine_bounds(getattr(dm, "rollout_cfg", None))

    def _eval_autocast(self):
        """On GPU the sweep computes in the trainer's compute dtype (bf16 under ``bf16-mixed``), as training does."""
        dtype = self._compute_dtype()
        device = self.policy.device if not is_sharded(self.policy) else self.device
        if dtype is None or device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)
