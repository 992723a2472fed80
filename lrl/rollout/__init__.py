"""Rollout: the generator interface, the native engine and the records they produce."""

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.engine import NativeEngine
from lrl.rollout.types import RolloutBatch, SamplingParams
from lrl.rollout.unmasking import sample_tokens, select_unmask

__all__ = ["NativeEngine", "RolloutBatch", "RolloutGenerator", "SamplingParams", "sample_tokens", "select_unmask"]
