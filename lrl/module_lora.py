"""LoRA parts of `LightningRLModule` (issue 28 item 6): setup, merged weights, adapter-only checkpoints.

With ``model.init_args.lora`` the policy's transformers model carries peft LoRA layers (`lrl.models.lora`); the
frozen base is reloaded from ``checkpoint`` whenever the module is built, so a training checkpoint needs only the
trainable tensors (the adapters, and a planner head when there is one) and their optimizer states. Lightning's
strict loading still checks every name: `_lora_load` fills the frozen names from the freshly loaded base before
``load_state_dict`` runs.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from lrl.models.lora import MergedWeights, adapters_disabled, apply_lora, lora_settings
from lrl.models.sharding import unwrap


class LoraTraining:
    """Mixin of `LightningRLModule`, before `RLStep` (needs ``hparams``, ``loss_config``, ``policy``,
    ``_compute_dtype`` and ``_frozen_logprobs``)."""

    @staticmethod
    def _check_lora(lora, freeze_backbone: bool) -> dict | None:
        """``model.init_args.lora`` checked and stored as a plain dict (hparams.yaml-friendly); None: off."""
        if lora is None:
            return None
        if freeze_backbone:
            raise ValueError("model.init_args.lora with model.init_args.freeze_backbone=true: planner-only RL trains "
                             "no backbone weights, so adapters have nothing to do; set one of them off")
        return asdict(lora)

    def _setup_lora(self) -> None:
        """Adapt the freshly loaded policy (frozen base in the compute dtype, float32 adapters)."""
        settings = lora_settings(self.hparams.lora)
        if settings is not None:
            apply_lora(self.policy, settings, base_dtype=self._compute_dtype())

    def _reference_logprobs(self, batch, per_step: bool):
        """With LoRA the reference is the base: the policy's log-probs inside peft's ``disable_adapter()`` (no
        second model, nothing to offload); without, `RLStep._reference_logprobs` (the frozen copy)."""
        if self.hparams.lora is None:
            return super()._reference_logprobs(batch, per_step)
        if self.loss_config.kl_beta <= 0:
            return None
        with adapters_disabled(unwrap(self.policy)):
            return self._frozen_logprobs(self.policy, batch, per_step)

    def merged_policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights with the adapters merged, as plain HF names: computed one tensor at a time on the
        policy's device and kept in host memory (a full merged copy never sits on the GPU beside the policy);
        consumers (weight sync, Pareto saves) move each tensor where they need it."""
        return dict(MergedWeights(unwrap(self.policy).model, device="cpu"))

    def _trainable_keys(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def _lora_save(self, checkpoint: dict) -> None:
        """Keep only the trainable tensors (adapters, planner head) in ``checkpoint["state_dict"]``; the optimizer
        states already cover only them."""
        if self.hparams.lora is None:
            return
        keep = self._trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["lrl"]["lora"] = dict(self.hparams.lora)

    def _lora_load(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of other adapters (or none), then complete its state dict with the frozen base's
        tensors (the ones just loaded from ``checkpoint``), so strict loading checks the adapters' names."""
        saved = (checkpoint.get("lrl") or {}).get("lora")
        mine = self.hparams.lora
        if saved is None and mine is None:
            return
        if saved != mine:
            raise ValueError(f"model.init_args.lora: the checkpoint was trained with lora={saved}, this run sets "
                             f"lora={mine}; use the same adapters (or start a new run)")
        keep = self._trainable_keys()
        state = checkpoint["state_dict"]
        for name, tensor in self.state_dict().items():
            if name not in keep:
                state.setdefault(name, tensor)
