"""Callbacks of lrl: each one concern, validated in __init__, resumable through state_dict."""

from callbacks.checkpoint import AtomicCheckpointIO, RLCheckpoint
from callbacks.pareto_checkpoint import ParetoFrontierCheckpoint
from callbacks.reward_logger import RewardNormalizationLogger
from callbacks.rl_progress import RLProgressBar

__all__ = [
    "AtomicCheckpointIO",
    "ParetoFrontierCheckpoint",
    "RLCheckpoint",
    "RLProgressBar",
    "RewardNormalizationLogger",
]
