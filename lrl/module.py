"""`LightningRLModule`: the GRPO / LightningRL policy update as a LightningModule (spec §4, §9).

One training step consumes one `RolloutBatch` (rewards, filters and advantages already applied by the
datamodule): it computes old log-probs with the rollout weights (= the current policy: rollouts are on-policy),
reference log-probs if β > 0, then runs ``ppo_epochs`` × ``minibatches`` optimizer steps of
L = L_policy + β·KL + μ·NLL (`lrl.algorithms.losses`), each minibatch split into micro-batches whose
contributions are normalised by the whole minibatch's counts (across ranks), so the reduction never depends on
the micro-batch size. Manual optimization: several optimizer steps per batch, as in Lightning's PPO template.

The training step pulls its batch itself (``training_step(dataloader_iter)``): Lightning then does not prefetch
the next batch, so the next rollout starts only after this step's optimizer steps (strictly on-policy, and the
datamodule's cursor in a checkpoint is exact).
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy

from lrl.algorithms.logprobs import backward_logprobs, response_logprobs, single_pass_tokens
from lrl.algorithms.losses import LossStats, build_normalizer, lightningrl_loss
from lrl.algorithms.rollout_mismatch import mismatch_metrics, tis_weights
from lrl.models import BlockDiffusionLM, load_checkpoint
from lrl.models.sharding import (
    clip_grad_norm,
    full_state_dict,
    gathered,
    is_sharded,
    submodule_prefix,
    unwrap,
    wrap_fsdp,
)
from lrl.module_planner import PlannerTraining
from lrl.rollout.types import RolloutBatch


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps were skipped for a NaN/inf loss."""


class LightningRLModule(PlannerTraining, LightningModule):
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
        eps_low: PPO clip ε.
        eps_high: upper clip ε_high for non-negative advantages.
        kl_beta: β of the KL penalty against the frozen reference (0: no reference model is loaded).
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        nll_weight: μ of the NLL term on correct responses.
        nll_correct: which responses count as correct for the NLL: ``verifier`` (paper) or ``reward_nonneg``
            (released code's ``reward >= 0`` proxy, spec §3.6).
        policy_reduction: ``sequence`` or ``token``.
        kl_reduction: ``sequence`` or ``token``.
        nll_reduction: ``sequence`` or ``token``.
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
        tis_cap: truncated importance sampling (verl's TIS): weight each token's policy term by
            min(π_old/π_rollout, tis_cap), π_rollout being the engine's recorded sampling probability. Off (None) by
            default: the native engine samples from the training distribution (mismatch ≈ 0). Turn it on (2.0 is
            verl's usual cap) when ``rollout/logprob_abs_diff/mean`` is well above 0, e.g. SGLang rollouts in
            bf16 on another GPU. Trajectory estimator only.
        max_skipped_steps: stop with an error after this many optimizer steps skipped for a non-finite loss.
        max_rl_steps: stop after this many RL steps (rollout batches). Lightning's ``trainer.max_steps`` counts
            optimizer steps, which is ``minibatches × ppo_epochs`` per RL step and 0 for a step whose groups were
            all filtered out, so the run length is set here.
        eval_thresholds: dynamic thresholds of the validation Pareto sweep.
        eval_max_new_tokens: generation budget of the validation sweep.
        eval_static_anchor: include the 1-token-per-step anchor in the sweep.
        planner_head: dUltra (spec §8.3): `lrl.models.planner.PlannerConfig` fields (without hidden_size) of a
            fresh planner head, created when the checkpoint has none (a checkpoint's own head is always loaded).
        planner_lr: learning rate of the planner head (None: ``lr``).
        freeze_backbone: train the planner head only (planner-only RL); needs a planner head.
        eval_planner_thresholds: also sweep the greedy planner at these p thresholds (``planner@t`` points;
            needs a planner head).
        planner_ratio: how planner rollouts (``data.remasking_strategy: planner``) are trained (spec §8.3,
            `lrl.algorithms.planner_objective`): ``separate`` adds a PPO term over each step's decision
            log-probs to the per-token loss; ``joint`` uses one ratio per step whose log-prob is Σ decisions +
            Σ tokens of the step, with this loss's clip, KL and reductions over steps (needs a planner head and
            the trajectory estimator; one packed forward per micro-batch instead of two).
        reference_offload: keep the frozen reference on the CPU between its passes (on a GPU it then costs device
            memory only during the reference log-prob pass). The reference is held in the compute dtype (bf16 under
            ``bf16-mixed`` / ``bf16-true``), never as a second float32 copy.
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
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        kl_beta: float = 0.01,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        nll_weight: float = 0.1,
        nll_correct: Literal["verifier", "reward_nonneg"] = "verifier",
        policy_reduction: Literal["sequence", "token"] = "sequence",
        kl_reduction: Literal["sequence", "token"] = "token",
        nll_reduction: Literal["sequence", "token"] = "token",
        ppo_epochs: int = 1,
        minibatches: int = 1,
        micro_batch_size: int = 16,
        max_copies: int = 8,
        rows_per_forward: int = 8,
        gradient_checkpointing: bool = False,
        attention: Literal["sdpa", "flex"] = "sdpa",
        tis_cap: float | None = None,
        max_skipped_steps: int = 3,
        max_rl_steps: int | None = None,
        eval_thresholds: list[float] = (0.95, 0.9, 0.8, 0.7, 0.5),
        eval_max_new_tokens: int = 256,
        eval_static_anchor: bool = True,
        planner_head: dict | None = None,
        planner_lr: float | None = None,
        freeze_backbone: bool = False,
        eval_planner_thresholds: list[float] = (),
        planner_ratio: Literal["separate", "joint"] = "separate",
        reference_offload: bool = True,
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
        if eps_low < 0 or eps_high < 0 or eps_low >= 1:
            raise ValueError(f"model.eps_low must be in [0, 1) and eps_high >= 0, got {eps_low}, {eps_high}")
        if kl_beta < 0 or nll_weight < 0:
            raise ValueError(f"model.kl_beta and model.nll_weight must be >= 0, got {kl_beta}, {nll_weight}")
        if block_size is not None and block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if tis_cap is not None and tis_cap <= 0:
            raise ValueError(f"model.tis_cap must be > 0 (or null: off), got {tis_cap}")
        if tis_cap is not None and estimator != "trajectory":  # π_old must be scored in the sampling state
            raise ValueError(f"model.tis_cap needs model.estimator=trajectory (got {estimator!r}): only it scores "
                             "each token in the state that sampled it, like the rollout's log-probs")
        bad = [t for t in eval_thresholds if not 0.0 <= t <= 1.0]
        if bad or not eval_thresholds:
            raise ValueError(
                f"model.eval_thresholds must be a non-empty list of values in [0, 1], got {eval_thresholds}"
            )
        if planner_ratio not in ("separate", "joint"):
            raise ValueError(f"model.planner_ratio must be 'separate' or 'joint', got {planner_ratio!r}")
        if planner_lr is not None and planner_lr <= 0:
            raise ValueError(f"model.planner_lr must be > 0 (or null: model.lr), got {planner_lr}")
        if eval_max_new_tokens <= 0 or (max_rl_steps is not None and max_rl_steps < 1):
            raise ValueError(f"model.eval_max_new_tokens and model.max_rl_steps must be >= 1, got "
                             f"{eval_max_new_tokens}, {max_rl_steps}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.policy: BlockDiffusionLM | None = None
        self.tokenizer = None
        self._ref: list[BlockDiffusionLM] = []  # a list keeps the frozen ref out of state_dict and .to()
        self.skipped_steps = 0
        self.rl_step = 0
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
        if hp.kl_beta > 0:
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()  # weights are loaded into the policy right after this hook
        state = checkpoint.get("lrl", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rl_step = int(state.get("rl_step", 0))

    def on_train_start(self) -> None:
        max_steps = self.hparams.max_rl_steps
        if max_steps is not None and self.rl_step >= max_steps:  # a resumed run that had already finished
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"lrl: the run is already at RL step {self.rl_step} of model.max_rl_steps={max_steps}; "
                           "nothing to train (raise model.init_args.max_rl_steps to continue)")
            self.trainer.should_stop = True

    # ------------------------------------------------------------------ log-probs
    def _logprobs(self, lm: BlockDiffusionLM, batch: RolloutBatch, rows: list[int], with_entropy: bool = False,
                  stats: dict | None = None, backward=None, loss_fn=None, sync=None):
        """Log-probs of the responses ``rows`` (`response_logprobs`); with ``backward`` and ``loss_fn``, their loss
        backpropagated forward by forward instead (`backward_logprobs`, ``sync``: its ``sync_backwards``)."""
        hp = self.hparams
        sp = batch.sampling
        sampled = sp is not None and not sp.greedy  # greedy (or unknown) rollouts: the plain log-softmax
        if backward is not None:
            fn, extra = backward_logprobs, {"backward": backward, "loss_fn": loss_fn, "sync_backwards": sync}
        else:
            fn, extra = response_logprobs, {"sync_forwards": self._forward_sync_for(lm)}
        return fn(
            lm,
            [batch.prompt_ids[i] for i in rows],
            [batch.response_ids[i] for i in rows],
            [batch.step_maps[i] for i in rows],
            estimator=hp.estimator,
            block_size=self.rollout_block_size,
            pad_id=self.tokenizer.pad_token_id,
            max_copies=hp.max_copies,
            rows_per_forward=hp.rows_per_forward,
            with_entropy=with_entropy,
            tail_ids=[batch.tail_ids[i] for i in rows],
            tail_step_maps=[batch.tail_step_maps[i] for i in rows],
            temperature=sp.temperature if sampled else 1.0,
            top_k=sp.top_k if sampled else 0,
            top_p=sp.top_p if sampled else 1.0,
            stats=stats,
            **extra,
        )

    @torch.no_grad()
    def _frozen_logprobs(self, lm: BlockDiffusionLM, batch: RolloutBatch, per_step: bool = False
                         ) -> list[torch.Tensor]:
        """Per-response log-prob tensors of a frozen model (old or reference), computed micro-batch-wise: one per
        token, or with ``per_step`` one per denoising step (decisions + tokens: the joint planner objective)."""
        out = []
        n, mbs = len(batch), self.hparams.micro_batch_size
        was_training = lm.training
        lm.eval()
        # a sharded policy runs through its wrapper, one unit gathered at a time (never the whole float32 model);
        # the planner's per-step path calls submodules directly and needs the full weights
        through_wrapper = is_sharded(lm) and not per_step
        with contextlib.nullcontext() if through_wrapper else gathered(lm):
            target = lm if through_wrapper else unwrap(lm)
            for s in range(0, n, mbs):
                rows = list(range(s, min(n, s + mbs)))
                if per_step:
                    dec, tok, steps = self._step_logprobs(target, batch, rows)
                    out.extend((dec + tok).split(steps))
                else:
                    logp, _ = self._logprobs(target, batch, rows)
                    out.extend(logp.split([len(batch.response_ids[i]) for i in rows]))
        lm.train(was_training)
        return out

    # ------------------------------------------------------------------ the step
    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)  # Lightning yields (batch, batch_idx, dataloader_idx)
        self.last_batch = batch  # for callbacks (the hook's `batch` argument is the iterator in this mode)
        hp = self.hparams
        if len(batch) and batch.advantages is None:
            raise ValueError("training batch has no advantages: the datamodule must compute rewards first")
        t0 = time.perf_counter()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        if hp.reset_optimizer_each_step:  # released code: a new optimizer and warmup every RL step (spec §4.5)
            opt.optimizer.state.clear()
            sched.last_epoch = 0
            for group, lr in zip(opt.optimizer.param_groups, sched.base_lrs):
                group["lr"] = lr * sched.lr_lambdas[0](0)
        self.policy.train()
        n = len(batch)
        # with a single optimizer step the policy has not moved when each micro-batch runs, so the rollout-policy
        # log-probs are exactly the current ones (detached): no separate no-grad pass
        single_step = hp.ppo_epochs == 1 and hp.minibatches == 1
        world = self.trainer.world_size if self.trainer is not None else 1
        plan_on = self._check_planner_batch(batch, world)
        joint = plan_on and self.joint_ratio  # steps, not tokens, are the loss's units
        old = self._frozen_logprobs(self.policy, batch, joint) if n and not single_step else None
        ref_model = self.reference
        use_ref = n and ref_model is not None and hp.kl_beta > 0
        ref = self._frozen_logprobs(ref_model, batch, joint) if use_ref else None
        if use_ref and hp.reference_offload and ref_model.device.type != "cpu":
            ref_model.to("cpu")  # device memory only during its pass (docs/memory.md)
        if hp.nll_correct == "verifier" or not n:
            correct = batch.correct if batch.correct is not None else torch.zeros(n, dtype=torch.bool)
        else:
            correct = batch.rewards["total"] >= 0
        adv = batch.advantages.float() if n else torch.zeros(0)
        rollout_lp = batch.sampling_logprobs
        if hp.tis_cap is not None and n and rollout_lp is None:
            raise ValueError(f"model.tis_cap={hp.tis_cap} needs the rollout's sampling log-probs, but the rollout "
                             "generator returned none (RolloutBatch.sampling_logprobs is None)")
        mismatch: list[tuple[torch.Tensor, torch.Tensor]] = []  # (old, rollout) log-probs of the same tokens
        forward_stats: dict = {}  # positions run through the decoder by the training forwards of this step
        plan_sum = 0.0
        total_stats: LossStats | None = None
        grad_norms: list[float] = []
        entropy_sum, entropy_count = 0.0, 0
        gen = torch.Generator().manual_seed(int(self.rl_step))
        n_opt = 0
        for epoch in range(hp.ppo_epochs):
            order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
            # exactly `minibatches` chunks on every rank (some may be empty) so collectives stay in lockstep
            for mb_tensor in torch.tensor_split(order, hp.minibatches):
                mb = mb_tensor.tolist()
                seq_tokens = torch.tensor([self._num_steps(batch, i) if joint else len(batch.response_ids[i])
                                           for i in mb], dtype=torch.long)
                norm = build_normalizer(seq_tokens, correct[mb] if mb else torch.zeros(0, dtype=torch.bool))
                micro = [
                    list(range(i, min(len(mb), i + hp.micro_batch_size)))
                    for i in range(0, len(mb), hp.micro_batch_size)
                ]
                n_micro = len(micro)
                if world > 1:
                    norm = norm.all_reduced()
                    n_micro = int(self.all_gather(torch.tensor(n_micro, device=self.device)).max())
                opt.zero_grad(set_to_none=True)
                mb_stats = None
                for m in range(n_micro):
                    if m >= len(micro):  # this rank has fewer micro-batches: zero-loss passes keep DDP/FSDP in step
                        if joint or hp.freeze_backbone:
                            self.manual_backward(self._zero_loss())
                        else:  # as many passes as the ranks' chunked backward runs (`backward_logprobs`)
                            if hp.estimator == "masked_states":  # its no-grad pass first
                                with torch.no_grad():
                                    for _ in range(self._sync_forwards(0)):
                                        self._zero_loss(sync=False)
                            for _ in range(self._sync_forwards(0) + int(plan_on)):
                                self.manual_backward(self._zero_loss(sync=False))
                        continue
                    local = micro[m]
                    rows = [mb[i] for i in local]
                    ent = None
                    if joint:  # dUltra, one ratio per step: decisions + tokens (module_planner)
                        out = self._joint_loss(batch, rows, local, adv, norm, old, ref, correct)
                    elif not hp.freeze_backbone:  # forward and backward per rows_per_forward rows
                        acc = self._chunked_backward(batch, rows, local, adv, norm, old, ref, correct, rollout_lp,
                                                     epoch == 0, world, mismatch, forward_stats)
                        mb_stats = acc["stats"] if mb_stats is None else mb_stats + acc["stats"]
                        entropy_sum += acc["entropy_sum"]
                        entropy_count += acc["entropy_count"]
                        if plan_on:  # dUltra, separate: the decisions' PPO term beside the tokens'
                            plan_loss = self._planner_loss(batch, rows, adv, single_step, len(mb))
                            plan_sum += float(plan_loss.detach())
                            self.manual_backward(plan_loss * world)
                        continue
                    else:  # planner-only RL: the token loss is logged, only the planner term trains
                        logp, ent = self._logprobs(self.policy, batch, rows, with_entropy=epoch == 0,
                                                   stats=forward_stats)
                        inputs = self._token_inputs(batch, rows, local, adv, old, ref, correct, rollout_lp,
                                                    logp.detach(), logp.device)
                        if epoch == 0 and inputs["roll"] is not None:
                            mismatch.append((inputs["old"].float().cpu(), inputs["roll"].cpu()))
                        out = self._token_loss(logp, inputs, norm)
                    if ent is not None:
                        entropy_sum += float(ent.sum())
                        entropy_count += ent.numel()
                    mb_stats = out.stats if mb_stats is None else mb_stats + out.stats
                    loss = out.loss
                    if plan_on and not joint:  # dUltra, separate: the decisions' PPO term beside the tokens'
                        plan_loss = self._planner_loss(batch, rows, adv, single_step, len(mb))
                        plan_sum += float(plan_loss.detach())
                        loss = plan_loss if hp.freeze_backbone else loss + plan_loss
                    # DDP averages gradients over ranks; contributions are already globally normalised.
                    self.manual_backward(loss * world if not out.nonfinite else self._zero_loss())
                bad = torch.tensor(float(mb_stats is not None and bool(mb_stats.nonfinite > 0)), device=self.device)
                if world > 1:
                    bad = self.all_gather(bad).max()
                if norm.num_tokens == 0:  # nothing to learn anywhere: no step (AdamW would still move weights)
                    opt.zero_grad(set_to_none=True)
                elif bool(bad > 0):
                    opt.zero_grad(set_to_none=True)
                    self.skipped_steps += 1
                    if self.skipped_steps > hp.max_skipped_steps:
                        raise NonFiniteLossError(
                            f"{self.skipped_steps} optimizer steps had a non-finite loss "
                            f"(model.max_skipped_steps={hp.max_skipped_steps}); lower the learning rate or check "
                            "the rollouts"
                        )
                else:
                    if hp.max_grad_norm > 0:
                        grad_norm = clip_grad_norm(self.policy, hp.max_grad_norm)
                        grad_norms.append(float(grad_norm))
                    opt.step()
                    sched.step()
                    n_opt += 1
                if mb_stats is not None:
                    total_stats = mb_stats if total_stats is None else total_stats + mb_stats
        opt.zero_grad(set_to_none=True)  # gradients hold no memory during rollouts and evaluation
        self.rl_step += 1
        if hp.max_rl_steps is not None and self.rl_step >= hp.max_rl_steps:
            self.trainer.should_stop = True
        extra = {"train/skipped_steps": float(self.skipped_steps), "train/optimizer_steps": float(n_opt)}
        if grad_norms:
            extra["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        extra.update(mismatch_metrics(mismatch, hp.tis_cap))
        if forward_stats.get("forward_tokens") and n:
            sp_bs = unwrap(self.policy).bd.block_size
            full = [len(batch.prompt_ids[i]) + len(batch.response_ids[i]) + len(batch.tail_ids[i]) for i in range(n)]
            single = single_pass_tokens([len(p) for p in batch.prompt_ids], full, sp_bs) * hp.ppo_epochs
            extra["train/forward_tokens"] = float(forward_stats["forward_tokens"])
            extra["train/forward_tokens_vs_single_pass"] = forward_stats["forward_tokens"] / max(single, 1)
        if plan_on and not joint:
            extra["loss/planner"] = plan_sum / max(n_opt, 1)
        self._log_step(
            batch, total_stats, entropy_sum / max(entropy_count, 1), time.perf_counter() - t0, max(n_opt, 1), extra
        )

    def _zero_loss(self, sync: bool = True) -> torch.Tensor:
        """A loss of exactly 0 that still runs a forward/backward through the policy (gradient-sync hooks fire);
        ``sync``: match the other ranks' forward count first (a collective under FSDP)."""
        pad = self.tokenizer.pad_token_id
        logp, _ = response_logprobs(self.policy, [[pad]], [[pad]], [[1]], estimator="single_pass", pad_id=pad,
                                    sync_forwards=self._forward_sync_for(self.policy) if sync else None)
        return logp.sum() * 0.0

    def _token_inputs(self, batch, rows, local, adv, old, ref, correct, rollout_lp, current, dev) -> dict:
        """Per-token inputs of the loss for the responses ``rows`` (flat, response-major). ``current``: the
        detached current log-probs, the old ones when there is no separate old pass (a single optimizer step)."""
        lengths = torch.tensor([len(batch.response_ids[i]) for i in rows])
        old_logp = current if old is None else torch.cat([old[i] for i in rows]).to(dev)
        roll = None
        if rollout_lp is not None:
            roll = torch.tensor([x for i in rows for x in rollout_lp[i]], dtype=torch.float32, device=dev)
        return {
            "old": old_logp,
            "adv": torch.repeat_interleave(adv[rows], lengths).to(dev),
            "seq": torch.repeat_interleave(torch.tensor(local), lengths).to(dev),
            "ref": torch.cat([ref[i] for i in rows]).to(dev) if ref is not None else None,
            "correct": torch.repeat_interleave(correct[rows], lengths).to(dev),
            "roll": roll,
        }

    def _token_loss(self, logp, inputs: dict, norm, index: torch.Tensor | None = None):
        """`lightningrl_loss` of the tokens ``index`` (all when None) of `_token_inputs`' responses: a sum over
        tokens with the minibatch's global normalisers, so parts over disjoint token sets add up to the whole."""
        hp = self.hparams

        def pick(t):
            return t if t is None or index is None else t[index]

        old_logp, roll = pick(inputs["old"]), pick(inputs["roll"])
        return lightningrl_loss(
            logp,
            old_logp,
            pick(inputs["adv"]),
            pick(inputs["seq"]),
            norm,
            ref_logp=pick(inputs["ref"]),
            correct_tokens=pick(inputs["correct"]),
            eps_low=hp.eps_low,
            eps_high=hp.eps_high,
            kl_beta=hp.kl_beta if inputs["ref"] is not None else 0.0,
            kl_estimator=hp.kl_estimator,
            nll_weight=hp.nll_weight,
            policy_reduction=hp.policy_reduction,
            kl_reduction=hp.kl_reduction,
            nll_reduction=hp.nll_reduction,
            is_weights=tis_weights(old_logp, roll, hp.tis_cap) if hp.tis_cap is not None else None,
        )

    def _chunked_backward(self, batch, rows, local, adv, norm, old, ref, correct, rollout_lp, first_epoch, world,
                          mismatch, forward_stats) -> dict:
        """One micro-batch's loss, forward and backward per ``rows_per_forward`` packed rows (`backward_logprobs`):
        training memory is one forward's activations, whatever the micro-batch size (issue 28)."""
        dev = self.policy.device if not is_sharded(self.policy) else self.device
        n_tok = sum(len(batch.response_ids[i]) for i in rows)
        # single optimizer step (old is None): the old log-probs are the current ones, filled in chunk by chunk
        inputs = self._token_inputs(batch, rows, local, adv, old, ref, correct, rollout_lp,
                                    torch.zeros(n_tok, device=dev), dev)
        acc = {"stats": None, "entropy_sum": 0.0, "entropy_count": 0}

        def loss_fn(logp, index, ent):
            if old is None:
                inputs["old"][index] = logp.detach().to(inputs["old"].dtype)
            out = self._token_loss(logp, inputs, norm, index)
            if first_epoch and inputs["roll"] is not None:
                mismatch.append((inputs["old"][index].float().cpu(), inputs["roll"][index].cpu()))
            acc["stats"] = out.stats if acc["stats"] is None else acc["stats"] + out.stats
            if ent is not None:
                acc["entropy_sum"] += float(ent.sum())
                acc["entropy_count"] += ent.numel()
            return out.loss, out.nonfinite

        self._logprobs(self.policy, batch, rows, with_entropy=first_epoch, stats=forward_stats,
                       backward=lambda loss: self.manual_backward(loss * world), loss_fn=loss_fn,
                       sync=self._sync_forwards if world > 1 else None)
        return acc

    def _log_step(
        self,
        batch: RolloutBatch,
        stats: LossStats | None,
        entropy: float,
        train_s: float,
        n_opt: int,
        extra: dict[str, float],
    ) -> None:
        metrics = {**(stats.metrics() if stats is not None else {}), **extra}
        if not len(batch):  # every group was filtered out, even after refills
            metrics["filter/empty_step"] = 1.0
            metrics.update({k: float(v) for k, v in batch.stats.items()})
            self.log_dict(metrics, on_step=True, batch_size=1)
            return
        # stats are sums over minibatches and epochs; report per optimizer step
        for k in ("loss/policy", "loss/kl", "loss/nll"):
            metrics[k] = metrics.get(k, 0.0) / n_opt
        metrics["loss/total"] = metrics["loss/policy"] + metrics["loss/kl"] + metrics["loss/nll"]
        metrics["entropy"] = entropy
        metrics["timing/train_s"] = train_s
        metrics["lr"] = self.lr_schedulers().get_last_lr()[0]
        metrics["rl_step"] = float(self.rl_step)
        tpf = batch.tpf
        metrics["tpf/mean"] = float(tpf.mean())
        metrics["tpf/batch"] = batch.batch_tpf
        metrics["completions/mean_length"] = float(batch.response_lengths.float().mean())
        metrics["completions/clipped_ratio"] = float(batch.truncated.float().mean())
        if batch.accuracy is not None:
            metrics["reward/accuracy/mean"] = float(batch.accuracy.float().mean())
        for k, v in batch.stats.items():
            metrics[k] = float(v)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))

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
        from lrl.evaluation import run_pareto_sweep
        from lrl.models.generation import checkpoint_stop_ids
        from lrl.rollout.engine import NativeEngine

        hp = self.hparams
        stop = checkpoint_stop_ids(hp.checkpoint, self.tokenizer, stop_token_ids)
        was_training = self.policy.training
        self.policy.eval()
        try:
            with gathered(self.policy):  # sharded policy: the engine calls submodules directly
                engine = NativeEngine(unwrap(self.policy), self.tokenizer)
                return run_pareto_sweep(
                    engine,
                    task,
                    records,
                    thresholds=list(thresholds or hp.eval_thresholds),
                    block_size=self.rollout_block_size,
                    max_new_tokens=hp.eval_max_new_tokens,
                    stop_token_ids=stop,
                    static_anchor=hp.eval_static_anchor,
                    y_max=y_max,
                    planner_thresholds=list(hp.eval_planner_thresholds),
                )
        finally:
            self.policy.train(was_training)

