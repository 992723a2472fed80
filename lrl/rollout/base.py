"""The rollout interface used by the datamodule, the evaluation and the trainer (verl's BaseRollout, slimmed)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lrl.rollout.types import RolloutBatch, SamplingParams


@dataclass
class PolicyWeights:
    """The policy's weights as a generator takes them at a sync.

    Attributes:
        lm: the policy `BlockDiffusionLM` (its config and block-diffusion identity, for a sync through disk).
        state_dict: its full tensors under HF names (gathered from the shards under FSDP).
        tokenizer: the policy's tokenizer (saved beside the weights of a disk sync).
        extra: more named tensors for an in-process engine (``planner.*``: dUltra's planner head).
    """

    lm: Any
    state_dict: Mapping[str, torch.Tensor]
    tokenizer: Any = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)


class RolloutGenerator(abc.ABC):
    """Generates responses for prompts with some policy weights; knows which weights it has (``weight_version``,
    the `LightningRLModule.rl_step` whose weights it last took).

    Weight sync is part of the contract: before every RL step's rollouts the pipeline (`lrl.pipeline`) makes the
    generator hold the policy's current weights with `sync_weights` (or, where every rank shares one generator,
    rank 0 syncs and the others `adopt_version`), unless `reads_weights_of` says it decodes with the policy's own
    tensors."""

    weight_version: int = 0
    #: one generator (rollout servers) serves every rank: only global rank 0 pushes weights to it
    shared_across_ranks: bool = False

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams) -> RolloutBatch:
        """``samples_per_prompt`` responses for every prompt, group by group (group i = prompt i)."""

    @abc.abstractmethod
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> None:
        """Load new policy weights (HF parameter names) and set ``weight_version`` (default: current + 1)."""

    def reads_weights_of(self, lm: torch.nn.Module) -> bool:
        """True when this generator decodes with ``lm``'s own tensors (nothing to sync). Default: it holds a copy."""
        return False

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        """Take the policy's weights as ``version``. Default: `update_weights` with the full and extra tensors."""
        self.update_weights({**weights.state_dict, **weights.extra}, version=version)

    def adopt_version(self, version: int) -> None:
        """Take ``version`` as current after another rank synced this (shared) generator."""
        self.weight_version = int(version)

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
