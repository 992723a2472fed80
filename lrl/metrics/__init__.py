"""Evaluation metrics: AUP and the Pareto frontier (spec §6.3), response accuracy and tokens per forward (§6.2)."""

from lrl.metrics.aup import aup, pareto_frontier
from lrl.metrics.metrics import ResponseAccuracy, TokensPerForward

__all__ = ["ResponseAccuracy", "TokensPerForward", "aup", "pareto_frontier"]
