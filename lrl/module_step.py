"""One RL step of `LightningRLModule` (spec §4, §9): the log-prob passes, the minibatch loop and the logged metrics.

`RLStep.training_step` reads top to bottom: old and reference log-probs once (`_step_inputs`), then
``ppo_epochs × minibatches`` optimizer steps (`_minibatch_step`), each over micro-batches whose loss terms are
sums divided by the whole minibatch's counts (all-reduced across ranks), so ``micro_batch_size`` is a memory knob
only; then the step's metrics (`_log_step`). The loss knobs are the module's `LossConfig` (``model.init_args.loss``).

A mixin: it reads the module's ``hparams``, ``loss_config``, ``policy``, ``reference``, ``tokenizer``,
``rollout_block_size`` and the planner mixin's losses (`lrl.module_planner`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import torch

from lrl.algorithms.logprobs import Scoring, backward_logprobs, response_logprobs, single_pass_tokens
from lrl.algorithms.losses import LossConfig, LossNormalizer, LossStats, build_normalizer, lightningrl_loss
from lrl.algorithms.rollout_mismatch import mismatch_metrics, tis_weights
from lrl.models import BlockDiffusionLM
from lrl.models.sharding import clip_grad_norm, gathered, is_sharded, unwrap
from lrl.rollout.types import RolloutBatch


class NonFiniteLossError(RuntimeError):
    """Raised after too many optimizer steps were skipped for a NaN/inf loss."""


@dataclass
class StepInputs:
    """What every minibatch of one RL step reads (per response of the batch, N responses).

    Args:
        batch: the rollout batch.
        adv: (N,) float advantages.
        correct: (N,) bool, the responses the NLL term trains on (``model.init_args.loss.nll_correct``).
        old: per-response old log-probs (per token, or per step under the joint planner ratio); None with a single
            optimizer step (the policy has not moved when each micro-batch runs: the detached current ones).
        single_step: one optimizer step per RL step (``ppo_epochs`` = ``minibatches`` = 1).
        ref: per-response reference log-probs; None without KL.
        rollout_lp: the engine's sampling log-probs (mismatch metrics and TIS), or None.
        world: ranks.
        plan_on: the batch trains the planner (planner rollouts).
        joint: dUltra's joint ratio: steps, not tokens, are the loss's units.
    """

    batch: RolloutBatch
    adv: torch.Tensor
    correct: torch.Tensor
    old: list[torch.Tensor] | None
    single_step: bool
    ref: list[torch.Tensor] | None
    rollout_lp: list[list[float]] | None
    world: int
    plan_on: bool
    joint: bool


@dataclass
class StepTotals:
    """Sums over one RL step's minibatches and epochs, logged at its end."""

    stats: LossStats | None = None
    grad_norms: list[float] = field(default_factory=list)
    entropy_sum: float = 0.0
    entropy_count: int = 0
    plan_sum: float = 0.0
    n_opt: int = 0
    mismatch: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (old, rollout) of same tokens
    forward_stats: dict = field(default_factory=dict)  # positions run through the decoder by the training forwards

    def add_entropy(self, ent: torch.Tensor | None) -> None:
        if ent is not None:
            self.entropy_sum += float(ent.sum())
            self.entropy_count += ent.numel()


def _add(a: LossStats | None, b: LossStats) -> LossStats:
    return b if a is None else a + b


class RLStep:
    """`LightningRLModule.training_step` and its pieces (see the module docstring)."""

    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)  # Lightning yields (batch, batch_idx, dataloader_idx)
        self.last_batch = batch  # for callbacks (the hook's `batch` argument is the iterator in this mode)
        hp = self.hparams
        t0 = time.perf_counter()
        if hp.reset_optimizer_each_step:  # released code: a new optimizer and warmup every RL step (spec §4.5)
            self._reset_optimizer()
        self.policy.train()
        inputs = self._step_inputs(batch)
        totals = StepTotals()
        gen = torch.Generator().manual_seed(int(self.rl_step))
        n = len(batch)
        for epoch in range(hp.ppo_epochs):
            order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
            # exactly `minibatches` chunks on every rank (some may be empty) so collectives stay in lockstep
            for mb in torch.tensor_split(order, hp.minibatches):
                self._minibatch_step(inputs, totals, mb.tolist(), epoch)
        self.optimizers().zero_grad(set_to_none=True)  # gradients hold no memory during rollouts and evaluation
        self.rl_step += 1
        if hp.max_rl_steps is not None and self.rl_step >= hp.max_rl_steps:
            self.trainer.should_stop = True
        self._log_step(inputs, totals, time.perf_counter() - t0)

    def _reset_optimizer(self) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.optimizer.state.clear()
        sched.last_epoch = 0
        for group, lr in zip(opt.optimizer.param_groups, sched.base_lrs):
            group["lr"] = lr * sched.lr_lambdas[0](0)

    def _step_inputs(self, batch: RolloutBatch) -> StepInputs:
        """Refuse a batch the step cannot train on; compute its old and reference log-probs (no grad)."""
        hp, n = self.hparams, len(batch)
        if n and batch.advantages is None:
            raise ValueError("training batch has no advantages: the datamodule must compute rewards first")
        world = self.trainer.world_size if self.trainer is not None else 1
        plan_on = self._check_planner_batch(batch, world)
        joint = plan_on and self.joint_ratio
        single_step = hp.ppo_epochs == 1 and hp.minibatches == 1
        old = self._frozen_logprobs(self.policy, batch, joint) if n and not single_step else None
        ref = self._reference_logprobs(batch, joint) if n else None
        if self.loss_config.nll_correct == "verifier" or not n:
            correct = batch.correct if batch.correct is not None else torch.zeros(n, dtype=torch.bool)
        else:
            correct = batch.rewards["total"] >= 0
        if self.loss_config.tis_cap is not None and n and batch.sampling_logprobs is None:
            raise ValueError(f"model.loss.tis_cap={self.loss_config.tis_cap} needs the rollout's sampling "
                             "log-probs, but the rollout generator returned none (RolloutBatch.sampling_logprobs "
                             "is None)")
        return StepInputs(batch=batch, adv=batch.advantages.float() if n else torch.zeros(0), correct=correct,
                          old=old, single_step=single_step, ref=ref, rollout_lp=batch.sampling_logprobs,
                          world=world, plan_on=plan_on, joint=joint)

    def _reference_logprobs(self, batch: RolloutBatch, per_step: bool) -> list[torch.Tensor] | None:
        """The frozen reference's log-probs (None without KL); the reference leaves the device after its pass."""
        if self.loss_config.kl_beta <= 0 or not self._ref:
            return None
        ref_model = self.reference
        ref = self._frozen_logprobs(ref_model, batch, per_step)
        if self.hparams.reference_offload and ref_model.device.type != "cpu":
            ref_model.to("cpu")  # device memory only during its pass (docs/memory.md)
        return ref

    # ------------------------------------------------------------------ one optimizer step
    def _minibatch_step(self, s: StepInputs, t: StepTotals, mb: list[int], epoch: int) -> None:
        """One optimizer step on the responses ``mb`` (indices into the batch): every micro-batch's loss share is
        backpropagated, then the step is taken, or skipped when nothing is trainable or a loss was non-finite."""
        norm, micro, n_micro = self._minibatch_plan(s, mb)
        self.optimizers().zero_grad(set_to_none=True)
        mb_stats = None
        for m in range(n_micro):
            if m >= len(micro):  # this rank has fewer micro-batches: zero-loss passes keep DDP/FSDP in step
                self._padding_backward(s)
                continue
            mb_stats = _add(mb_stats, self._micro_step(s, t, mb, micro[m], norm, epoch))
        self._optimizer_step(s, t, norm, mb_stats)

    def _minibatch_plan(self, s: StepInputs, mb: list[int]) -> tuple[LossNormalizer, list[list[int]], int]:
        """The minibatch's global counts (all ranks), its micro-batches (positions in ``mb``) and how many
        micro-batches every rank runs (the most any rank has)."""
        mbs = self.hparams.micro_batch_size
        units = [self._num_steps(s.batch, i) if s.joint else len(s.batch.response_ids[i]) for i in mb]
        norm = build_normalizer(torch.tensor(units, dtype=torch.long),
                                s.correct[mb] if mb else torch.zeros(0, dtype=torch.bool))
        micro = [list(range(i, min(len(mb), i + mbs))) for i in range(0, len(mb), mbs)]
        n_micro = len(micro)
        if s.world > 1:
            norm = norm.all_reduced()
            n_micro = int(self.all_gather(torch.tensor(n_micro, device=self.device)).max())
        return norm, micro, n_micro

    def _micro_step(self, s: StepInputs, t: StepTotals, mb: list[int], local: list[int], norm: LossNormalizer,
                    epoch: int) -> LossStats:
        """Forward and backward of one micro-batch (``local``: positions in ``mb``); returns its loss stats."""
        rows = [mb[i] for i in local]
        if s.joint:  # dUltra, one ratio per step: decisions + tokens (module_planner)
            out = self._joint_loss(s.batch, rows, local, s.adv, norm, s.old, s.ref, s.correct)
            self.manual_backward(out.loss * s.world if not out.nonfinite else self._zero_loss())
            return out.stats
        if self.hparams.freeze_backbone:  # planner-only RL: the token loss is logged, only the planner term trains
            logp, ent = self._logprobs(self.policy, s.batch, rows, with_entropy=epoch == 0, stats=t.forward_stats)
            inputs = self._token_inputs(s, rows, local, logp.detach(), logp.device)
            if epoch == 0 and inputs["roll"] is not None:
                t.mismatch.append((inputs["old"].float().cpu(), inputs["roll"].cpu()))
            out = self._token_loss(logp, inputs, norm)
            t.add_entropy(ent)
            loss = self._planner_term(s, t, rows, len(mb)) if s.plan_on else out.loss
            self.manual_backward(loss * s.world if not out.nonfinite else self._zero_loss())
            return out.stats
        stats = self._chunked_backward(s, t, rows, local, norm, epoch == 0)  # forward and backward per chunk
        if s.plan_on:  # dUltra, separate: the decisions' PPO term beside the tokens'
            self.manual_backward(self._planner_term(s, t, rows, len(mb)) * s.world)
        return stats

    def _planner_term(self, s: StepInputs, t: StepTotals, rows: list[int], num_responses: int) -> torch.Tensor:
        plan_loss = self._planner_loss(s.batch, rows, s.adv, s.single_step, num_responses)
        t.plan_sum += float(plan_loss.detach())
        return plan_loss

    def _padding_backward(self, s: StepInputs) -> None:
        """As many zero-loss passes as another rank's micro-batch runs (every forward/backward is a collective)."""
        if s.joint or self.hparams.freeze_backbone:
            self.manual_backward(self._zero_loss())
            return
        if self.hparams.estimator == "masked_states":  # its no-grad pass first (`backward_logprobs`)
            with torch.no_grad():
                for _ in range(self._sync_forwards(0)):
                    self._zero_loss(sync=False)
        for _ in range(self._sync_forwards(0) + int(s.plan_on)):
            self.manual_backward(self._zero_loss(sync=False))

    def _optimizer_step(self, s: StepInputs, t: StepTotals, norm: LossNormalizer, mb_stats: LossStats | None) -> None:
        """Clip and step, or skip: no trainable token anywhere (AdamW would still move the weights), or a
        non-finite loss on any rank (counted; too many stop the run)."""
        hp = self.hparams
        opt = self.optimizers()
        bad = torch.tensor(float(mb_stats is not None and bool(mb_stats.nonfinite > 0)), device=self.device)
        if s.world > 1:
            bad = self.all_gather(bad).max()
        if norm.num_tokens == 0:
            opt.zero_grad(set_to_none=True)
        elif bool(bad > 0):
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            if self.skipped_steps > hp.max_skipped_steps:
                raise NonFiniteLossError(
                    f"{self.skipped_steps} optimizer steps had a non-finite loss "
                    f"(model.max_skipped_steps={hp.max_skipped_steps}); lower the learning rate or check the rollouts"
                )
        else:
            if hp.max_grad_norm > 0:
                t.grad_norms.append(float(clip_grad_norm(self.policy, hp.max_grad_norm)))
            opt.step()
            self.lr_schedulers().step()
            t.n_opt += 1
        if mb_stats is not None:
            t.stats = _add(t.stats, mb_stats)

    def _zero_loss(self, sync: bool = True) -> torch.Tensor:
        """A loss of exactly 0 that still runs a forward/backward through the policy (gradient-sync hooks fire);
        ``sync``: match the other ranks' forward count first (a collective under FSDP)."""
        pad = self.tokenizer.pad_token_id
        logp, _ = response_logprobs(self.policy, [[pad]], [[pad]], [[1]], Scoring("single_pass", pad_id=pad),
                                    sync_forwards=self._forward_sync_for(self.policy) if sync else None)
        return logp.sum() * 0.0

    # ------------------------------------------------------------------ the token loss
    def _loss_for(self, has_ref: bool) -> LossConfig:
        """The loss knobs of a micro-batch: no KL term when there are no reference log-probs."""
        return self.loss_config if has_ref else replace(self.loss_config, kl_beta=0.0)

    def _token_inputs(self, s: StepInputs, rows, local, current, dev) -> dict:
        """Per-token inputs of the loss for the responses ``rows`` (flat, response-major). ``current``: the
        detached current log-probs, the old ones when there is no separate old pass (a single optimizer step)."""
        lengths = torch.tensor([len(s.batch.response_ids[i]) for i in rows])
        old_logp = current if s.old is None else torch.cat([s.old[i] for i in rows]).to(dev)
        roll = None
        if s.rollout_lp is not None:
            roll = torch.tensor([x for i in rows for x in s.rollout_lp[i]], dtype=torch.float32, device=dev)
        return {
            "old": old_logp,
            "adv": torch.repeat_interleave(s.adv[rows], lengths).to(dev),
            "seq": torch.repeat_interleave(torch.tensor(local), lengths).to(dev),
            "ref": torch.cat([s.ref[i] for i in rows]).to(dev) if s.ref is not None else None,
            "correct": torch.repeat_interleave(s.correct[rows], lengths).to(dev),
            "roll": roll,
        }

    def _token_loss(self, logp, inputs: dict, norm: LossNormalizer, index: torch.Tensor | None = None):
        """`lightningrl_loss` of the tokens ``index`` (all when None) of `_token_inputs`' responses: a sum over
        tokens with the minibatch's global normalisers, so parts over disjoint token sets add up to the whole."""

        def pick(x):
            return x if x is None or index is None else x[index]

        old_logp, roll, cap = pick(inputs["old"]), pick(inputs["roll"]), self.loss_config.tis_cap
        return lightningrl_loss(logp, old_logp, pick(inputs["adv"]), pick(inputs["seq"]), norm,
                                self._loss_for(inputs["ref"] is not None), ref_logp=pick(inputs["ref"]),
                                correct_tokens=pick(inputs["correct"]),
                                is_weights=tis_weights(old_logp, roll, cap) if cap is not None else None)

    def _chunked_backward(self, s: StepInputs, t: StepTotals, rows, local, norm, first_epoch: bool) -> LossStats:
        """One micro-batch's loss, forward and backward per ``rows_per_forward`` packed rows (`backward_logprobs`):
        training memory is one forward's activations, whatever the micro-batch size (issue 28)."""
        dev = self.policy.device if not is_sharded(self.policy) else self.device
        n_tok = sum(len(s.batch.response_ids[i]) for i in rows)
        # single optimizer step (old is None): the old log-probs are the current ones, filled in chunk by chunk
        inputs = self._token_inputs(s, rows, local, torch.zeros(n_tok, device=dev), dev)
        acc = {"stats": None}

        def loss_fn(logp, index, ent):
            if s.old is None:
                inputs["old"][index] = logp.detach().to(inputs["old"].dtype)
            out = self._token_loss(logp, inputs, norm, index)
            if first_epoch and inputs["roll"] is not None:
                t.mismatch.append((inputs["old"][index].float().cpu(), inputs["roll"][index].cpu()))
            acc["stats"] = _add(acc["stats"], out.stats)
            t.add_entropy(ent)
            return out.loss, out.nonfinite

        self._logprobs(self.policy, s.batch, rows, with_entropy=first_epoch, stats=t.forward_stats,
                       backward=lambda loss: self.manual_backward(loss * s.world), loss_fn=loss_fn,
                       sync=self._sync_forwards if s.world > 1 else None)
        return acc["stats"]

    # ------------------------------------------------------------------ log-probs
    def _logprobs(self, lm: BlockDiffusionLM, batch: RolloutBatch, rows: list[int], with_entropy: bool = False,
                  stats: dict | None = None, backward=None, loss_fn=None, sync=None):
        """Log-probs of the responses ``rows`` (`response_logprobs`); with ``backward`` and ``loss_fn``, their loss
        backpropagated forward by forward instead (`backward_logprobs`, ``sync``: its ``sync_backwards``)."""
        if backward is not None:
            fn, extra = backward_logprobs, {"backward": backward, "loss_fn": loss_fn, "sync_backwards": sync}
        else:
            fn, extra = response_logprobs, {"sync_forwards": self._forward_sync_for(lm)}
        return fn(lm, [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows],
                  [batch.step_maps[i] for i in rows], self._scoring(batch), tail_ids=[batch.tail_ids[i] for i in rows],
                  tail_step_maps=[batch.tail_step_maps[i] for i in rows], with_entropy=with_entropy, stats=stats,
                  **extra)

    def _scoring(self, batch: RolloutBatch) -> Scoring:
        """The module's estimator and packing knobs with the rollout's token distribution."""
        hp, sp = self.hparams, batch.sampling
        sampled = sp is not None and not sp.greedy  # greedy (or unknown) rollouts: the plain log-softmax
        return Scoring(estimator=hp.estimator, block_size=self.rollout_block_size, pad_id=self.tokenizer.pad_token_id,
                       max_copies=hp.max_copies, rows_per_forward=hp.rows_per_forward,
                       temperature=sp.temperature if sampled else 1.0, top_k=sp.top_k if sampled else 0,
                       top_p=sp.top_p if sampled else 1.0)

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
            for start in range(0, n, mbs):
                rows = list(range(start, min(n, start + mbs)))
                if per_step:
                    dec, tok, steps = self._step_logprobs(target, batch, rows)
                    out.extend((dec + tok).split(steps))
                else:
                    logp, _ = self._logprobs(target, batch, rows)
                    out.extend(logp.split([len(batch.response_ids[i]) for i in rows]))
        lm.train(was_training)
        return out

    # ------------------------------------------------------------------ metrics
    def _log_step(self, s: StepInputs, t: StepTotals, train_s: float) -> None:
        """The step's metrics (docs/metrics.md): loss terms per optimizer step, optimizer and mismatch counters,
        forward cost, rollout statistics of the batch."""
        batch, hp, n_opt = s.batch, self.hparams, max(t.n_opt, 1)
        metrics = {**(t.stats.metrics() if t.stats is not None else {}),
                   "train/skipped_steps": float(self.skipped_steps), "train/optimizer_steps": float(t.n_opt)}
        if t.grad_norms:
            metrics["train/grad_norm"] = sum(t.grad_norms) / len(t.grad_norms)
        metrics.update(mismatch_metrics(t.mismatch, self.loss_config.tis_cap))
        if t.forward_stats.get("forward_tokens") and len(batch):
            full = [len(batch.prompt_ids[i]) + len(batch.response_ids[i]) + len(batch.tail_ids[i])
                    for i in range(len(batch))]
            single = single_pass_tokens([len(p) for p in batch.prompt_ids], full, unwrap(self.policy).bd.block_size)
            metrics["train/forward_tokens"] = float(t.forward_stats["forward_tokens"])
            metrics["train/forward_tokens_vs_single_pass"] = t.forward_stats["forward_tokens"] / max(
                single * hp.ppo_epochs, 1)
        if s.plan_on and not s.joint:
            metrics["loss/planner"] = t.plan_sum / n_opt
        if not len(batch):  # every group was filtered out, even after refills
            metrics["filter/empty_step"] = 1.0
            metrics.update({k: float(v) for k, v in batch.stats.items()})
            self.log_dict(metrics, on_step=True, batch_size=1)
            return
        # stats are sums over minibatches and epochs; report per optimizer step
        for k in ("loss/policy", "loss/kl", "loss/nll"):
            metrics[k] = metrics.get(k, 0.0) / n_opt
        metrics["loss/total"] = metrics["loss/policy"] + metrics["loss/kl"] + metrics["loss/nll"]
        metrics.update(self._batch_metrics(batch, t.entropy_sum / max(t.entropy_count, 1), train_s))
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))

    def _batch_metrics(self, batch: RolloutBatch, entropy: float, train_s: float) -> dict[str, float]:
        metrics = {"entropy": entropy, "timing/train_s": train_s, "lr": self.lr_schedulers().get_last_lr()[0],
                   "rl_step": float(self.rl_step), "tpf/mean": float(batch.tpf.mean()), "tpf/batch": batch.batch_tpf,
                   "completions/mean_length": float(batch.response_lengths.float().mean()),
                   "completions/clipped_ratio": float(batch.truncated.float().mean())}
        if batch.accuracy is not None:
            metrics["reward/accuracy/mean"] = float(batch.accuracy.float().mean())
        metrics.update({k: float(v) for k, v in batch.stats.items()})
        return metrics
