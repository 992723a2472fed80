"""dUltra's side of `LightningRLModule` (spec §8.3): the planner head's setup, its optimizer group, and the two
ways its decisions enter the update (``model.planner_ratio``, `lrl.algorithms.planner_objective`).

A mixin: it reads the module's ``hparams``, ``loss_config``, ``policy``, ``tokenizer`` and ``rollout_block_size``,
and the step's ``_loss_for`` and ``_scoring`` (`lrl.module_step`).
"""

from __future__ import annotations

import torch

from lrl.algorithms.losses import LossNormalizer, LossOutput
from lrl.algorithms.planner_logprobs import planner_step_logprobs
from lrl.algorithms.planner_objective import joint_step_loss, planner_policy_loss
from lrl.models.sharding import is_sharded, unwrap
from lrl.rollout.types import RolloutBatch


class PlannerTraining:
    """Planner-head setup and losses of `LightningRLModule` (its docstring lists the ``planner_*`` arguments)."""

    @property
    def joint_ratio(self) -> bool:
        return self.hparams.planner_ratio == "joint"

    def _setup_planner(self) -> None:
        """Create a fresh head when asked and the checkpoint has none; freeze the backbone for planner-only RL."""
        hp = self.hparams
        if self.policy.planner is None and hp.planner_head is not None:
            from lrl.models.planner import PlannerConfig, PlannerHead

            self.policy.planner = PlannerHead(PlannerConfig(hidden_size=self.policy.hf_config.hidden_size,
                                                            **hp.planner_head))
        for key, on in (("freeze_backbone", hp.freeze_backbone), ("planner_ratio=joint", self.joint_ratio)):
            if on and self.policy.planner is None:
                raise ValueError(f"model.{key} needs a planner head: set model.planner_head or use a checkpoint "
                                 "that has one")
        if self.joint_ratio and hp.estimator != "trajectory":
            raise ValueError("model.planner_ratio=joint replays the step maps: it needs model.estimator=trajectory, "
                             f"got {hp.estimator}")
        if self.joint_ratio and self.loss_config.tis_cap is not None:
            raise ValueError("model.loss.tis_cap is not supported with model.planner_ratio=joint (set it to null)")
        if hp.freeze_backbone:
            self.policy.model.requires_grad_(False)

    def _param_groups(self) -> list[dict]:
        """AdamW groups: the backbone at ``lr`` (left out when frozen), the head at ``planner_lr`` (or ``lr``)."""
        hp = self.hparams
        head = getattr(self.policy, "planner", None)
        planner = list(head.parameters()) if head is not None else []
        ids = {id(p) for p in planner}
        backbone = [p for p in self.policy.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": g, "lr": lr} for g, lr in ((backbone, hp.lr), (planner, hp.planner_lr or hp.lr)) if g]

    def planner_state(self) -> dict[str, torch.Tensor]:
        """The planner head's tensors as ``planner.*`` names (empty without a head), for the native engine's sync."""
        head = getattr(unwrap(self.policy), "planner", None)
        return {} if head is None else {f"planner.{k}": v for k, v in head.state_dict().items()}

    def _check_planner_batch(self, batch: RolloutBatch, world: int) -> bool:
        """Whether this batch trains the planner (planner rollouts); refuse setups that cannot."""
        if not len(batch) or batch.planner_logprobs is None:
            if self.joint_ratio and len(batch):
                raise ValueError("model.planner_ratio=joint needs planner rollouts (data.remasking_strategy: planner)")
            return False
        if getattr(self.policy, "planner", None) is None or is_sharded(self.policy):
            raise ValueError("planner rollouts need an unsharded policy with a planner head (model.planner_head)")
        if world > 1:
            raise ValueError("planner training runs on one process for now (trainer.devices=1)")
        return True

    @staticmethod
    def _num_steps(batch: RolloutBatch, i: int) -> int:
        """Denoising steps of response ``i`` (its tail's included): the joint objective's units."""
        return max(list(batch.step_maps[i]) + list(batch.tail_step_maps[i]), default=0)

    def _step_logprobs(self, lm, batch: RolloutBatch, rows: list[int]):
        """`planner_step_logprobs` of these responses under the rollout's token distribution."""
        sc = self._scoring(batch)  # the step's packing knobs and the rollout's token distribution
        return planner_step_logprobs(
            lm, [batch.prompt_ids[i] for i in rows], [batch.response_ids[i] for i in rows],
            [batch.step_maps[i] for i in rows], block_size=sc.block_size, pad_id=sc.pad_id,
            max_copies=sc.max_copies, rows_per_forward=sc.rows_per_forward,
            tail_ids=[batch.tail_ids[i] for i in rows], tail_step_maps=[batch.tail_step_maps[i] for i in rows],
            temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p)

    def _planner_loss(self, batch: RolloutBatch, rows: list[int], adv: torch.Tensor, single_step: bool,
                      num_responses: int) -> torch.Tensor:
        """``separate``: `planner_policy_loss` of these responses: new decision log-probs from the training forward,
        old ones the rollout's records (the rollout ran with the current weights; one optimizer step: the detached
        new ones)."""
        dec, _, steps = self._step_logprobs(self.policy, batch, rows)
        if single_step:
            old = dec.detach()
        else:
            old = torch.tensor([x for i in rows for x in batch.planner_logprobs[i]], device=dec.device)
        return planner_policy_loss(dec, old, adv[rows], steps, eps_low=self.loss_config.eps_low,
                                   eps_high=self.loss_config.eps_high, num_responses=num_responses)

    def _joint_loss(self, batch: RolloutBatch, rows: list[int], local: list[int], adv: torch.Tensor,
                    norm: LossNormalizer, old: list[torch.Tensor] | None, ref: list[torch.Tensor] | None,
                    correct: torch.Tensor) -> LossOutput:
        """``joint``: `joint_step_loss` of these responses (``local``: their indices in the minibatch); ``old`` /
        ``ref``: per-response step log-probs of the whole batch (None: single optimizer step / no KL)."""
        dec, tok, steps = self._step_logprobs(self.policy, batch, rows)
        dev = dec.device
        counts = torch.tensor(steps)
        step_lp = (dec + tok).detach() if old is None else torch.cat([old[i] for i in rows]).to(dev)
        return joint_step_loss(
            dec, tok, step_lp, torch.repeat_interleave(adv[rows], counts).to(dev),
            torch.repeat_interleave(torch.tensor(local), counts).to(dev), norm, self._loss_for(ref is not None),
            ref_step_logp=torch.cat([ref[i] for i in rows]).to(dev) if ref is not None else None,
            correct_steps=torch.repeat_interleave(correct[rows], counts).to(dev))
