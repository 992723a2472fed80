"""LightningDataModules of lrl: rollout streaming for RL, supervised block-diffusion data for SFT."""

from datamodules.rollout import RolloutBackend, RolloutDataModule
from datamodules.sft import SFTDataModule

__all__ = ["RolloutBackend", "RolloutDataModule", "SFTDataModule"]
