"""The rollout interface used by the datamodule, the evaluation and the trainer (verl's BaseRollout, slimmed)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence

import torch

from lrl.rollout.types import RolloutBatch, SamplingParams


class RolloutGenerator(abc.ABC):
    """Generates responses for prompts with some policy weights; knows which weights it has."""

    weight_version: int = 0

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """``samples_per_prompt`` responses for every prompt, group by group (group i = prompt i)."""

    @abc.abstractmethod
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Load new policy weights (HF parameter names) and set ``weight_version`` (default: current + 1)."""

    def last_stats(self) -> dict[str, float]:
        """Scalar diagnostics of the last `generate` call (logged under these keys by the data module)."""
        return {}

    def release_memory(self) -> None:  # noqa: B027 - optional hook
        """Free what the rollout holds on the device (KV cache, graph pools, a colocated server's memory) before a
        training phase; the next `generate` (or `resume_memory`) takes it back. Default: nothing to free."""

    def resume_memory(self) -> None:  # noqa: B027 - optional hook
        """Take back what `release_memory` freed, before the next rollout phase. Default: nothing to do."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (servers, memory)."""
