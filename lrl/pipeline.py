"""One RL step's data, top to bottom (spec §3, the paper's Algorithm 1): the batch `LightningRLModule` trains on.

    0. sync      the rollout generator takes the policy's weights of this RL step (`RolloutGenerator` contract)
    1. draw      the next prompts of the epoch's order (`RolloutDataModule.draw`: state, ranks, epochs)
    2. generate  ``group_size`` responses per prompt, with their step maps and TPF
    3. score     the verifier's accuracy (length limit, worked steps), then every reward term's raw value
    4. shape     each term normalised within its prompt group and weighted; the total is their sum
    5. filter    drop groups without signal (`GroupFilter`); refill with new prompts, in rounds all ranks agree on
    6. advantages over the kept responses of every rank (batch statistics are all-reduced)
    7. batch     one `RolloutBatch` with rewards, advantages and the step's statistics

`RLStep.run` is that list; the data module holds the prompt state and the loaders and calls it once per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from lrl.rewards.terms import RewardTerm, check_terms, default_terms, reward_names, shape_terms
from lrl.rollout.base import PolicyWeights, RolloutGenerator
from lrl.rollout.types import RolloutBatch, SamplingParams

Advantage = Literal["batch", "prompt_group", "prompt_group_center"]
FILTER_COUNTS = ("groups_seen", "groups_kept", "dropped_all_wrong", "dropped_tpf_range", "dropped_zero_std")


@dataclass(frozen=True)
class GroupFilter:
    """Drop whole prompt groups that carry no learning signal (spec §3.4; `lrl.algorithms.filters`); the pipeline
    refills the batch with new prompts. Rules in this order, a group counted under the first that drops it. Every
    rule is off by default (keep every group); the paper: ``{all_wrong: true, tpf_range_threshold: 0.01}``.

    Args:
        all_wrong: drop groups with no correct response.
        tpf_range_threshold: drop groups whose TPF range max − min is below this (None: off; the paper 0.01).
        zero_std: drop groups whose total reward is constant (DAPO dynamic sampling).
    """

    all_wrong: bool = False
    tpf_range_threshold: float | None = None
    zero_std: bool = False

    @property
    def enabled(self) -> bool:
        return self.all_wrong or self.tpf_range_threshold is not None or self.zero_std

    def __post_init__(self) -> None:
        if self.tpf_range_threshold is not None and not self.tpf_range_threshold >= 0:
            raise ValueError(f"data.init_args.filter.tpf_range_threshold must be >= 0 (or null: off), got "
                             f"{self.tpf_range_threshold}")

    def __call__(self, batch: RolloutBatch):
        from lrl.algorithms.filters import filter_groups

        return filter_groups(batch.correct, batch.tpf, batch.rewards["total"], batch.group_index,
                             all_wrong=self.all_wrong, tpf_range_threshold=self.tpf_range_threshold,
                             zero_std=self.zero_std)


class PromptSource(Protocol):
    """What the pipeline needs of the data module."""

    task: Any

    def draw(self, n: int) -> list[dict]: ...

    def draws_left(self) -> int: ...

    def rollout_sampling(self, gen: RolloutGenerator, seed: int) -> SamplingParams: ...

    def rank_world(self) -> tuple[int, int]: ...


class RLStep:
    """The settings of one RL step's data and its run (see the module docstring).

    Args:
        rewards: the reward terms (`lrl.rewards.terms`); None: the paper's ±1 accuracy + z-scored TPF.
        group_filter: the group filter; None (or every rule off) keeps every group.
        advantage: ``batch`` (paper Eq. 7), ``prompt_group`` or ``prompt_group_center`` (spec §3.5).
        prompts_per_step: groups per step after filtering and refill.
        refill: draw new prompts for dropped groups (the paper); False: train on what the first round kept.
        max_refill_rounds: rollout rounds per step, the first included; every rank runs the same number.
        joint_normalization: normalise the summed raw terms once with this mode (the ablation); None: decoupled.
        truncated_is_wrong: responses that hit the length limit count as wrong.
        require_worked_steps: a right final answer counts only when the task's check of its worked steps holds.
        seed: base of the rollout seeds.
        sync_every_n_steps: take the policy's weights every n RL steps (0: never).
        release_after_rollout: free the generator's memory once the step's rollouts are done.
    """

    def __init__(self, *, rewards: list[RewardTerm] | None = None, group_filter: GroupFilter | None = None,
                 advantage: Advantage = "batch", prompts_per_step: int = 128, refill: bool = True,
                 max_refill_rounds: int = 4, joint_normalization: str | None = None, truncated_is_wrong: bool = True,
                 require_worked_steps: bool = False, seed: int = 0, sync_every_n_steps: int = 1,
                 release_after_rollout: bool = True):
        self.terms = list(default_terms() if rewards is None else rewards)
        check_terms(self.terms)
        self.group_filter = group_filter if group_filter is not None and group_filter.enabled else None
        self.advantage = advantage
        self.prompts_per_step = prompts_per_step
        self.refill = refill
        self.max_refill_rounds = max_refill_rounds
        self.joint = joint_normalization
        self.truncated_is_wrong = truncated_is_wrong
        self.require_worked_steps = require_worked_steps
        self.seed = seed
        self.sync_every = sync_every_n_steps
        self.release_after_rollout = release_after_rollout
        self.totals = dict.fromkeys(FILTER_COUNTS, 0)  # over the run (checkpointed by the data module)
        self.styles_seen: set[str] = set()  # answer styles seen in rollouts so far (diagnostics)
        self._synced = False

    def reward_names(self) -> list[str]:
        """The reward keys every batch carries, in a fixed order (the same on every rank, empty batches too)."""
        return reward_names(self.terms)

    # ------------------------------------------------------------------ the step
    def run(self, source: PromptSource, gen: RolloutGenerator, rl_step: int, policy=None) -> RolloutBatch:
        """One RL step's batch: ``rl_step`` is `LightningRLModule.rl_step`; ``policy`` the module whose weights the
        generator must hold (None: a generator used on its own keeps what it has)."""
        stats = {"timing/rollout_s": 0.0, "timing/reward_s": 0.0}
        stats.update(self.sync(gen, rl_step, policy))                                   # 0. sync
        rank, world = source.rank_world()
        target, have, budget = self.prompts_per_step, 0, source.draws_left()
        counts = {"filter/drawn": 0, "filter/kept": 0, "filter/dropped_all_wrong": 0, "filter/dropped_tpf_range": 0,
                  "filter/dropped_zero_std": 0, "filter/rounds": 0, "filter/step_rounds": 0,
                  "filter/refill_capped": 0.0}
        kept_parts, drawn, engine_stats = [], [], []
        for attempt in range(self.max_refill_rounds):
            want = target - have if attempt == 0 or self.refill else 0
            need = min(want, budget) if want > 0 else 0
            if want > 0 and budget <= 0:
                counts["filter/refill_capped"] = 1.0  # refill stopped: no unseen prompt left
            if not any_rank(need > 0, world):  # every rank runs the same rounds: none waits past the others
                break
            counts["filter/step_rounds"] += 1
            if need == 0:
                continue
            budget -= need
            records = source.draw(need)                                                 # 1. draw
            prompts = [source.task.prompt(r) for r in records]
            seed = ((self.seed * 7_919 + rl_step) * 101 + attempt) * 1_009 + rank
            t = time.perf_counter()
            batch = gen.generate(prompts, source.rollout_sampling(gen, seed))           # 2. generate
            stats["timing/rollout_s"] += time.perf_counter() - t
            engine_stats.append(gen.last_stats())
            batch.prompts = prompts
            batch.ground_truths = [source.task.ground_truth(r) for r in records]
            t = time.perf_counter()
            self.score(batch, records, source.task)                                     # 3.–4. score, shape
            stats["timing/reward_s"] += time.perf_counter() - t
            drawn.append(batch)
            counts["filter/drawn"] += need
            counts["filter/rounds"] += 1
            kept = self.filter(batch, counts)                                           # 5. filter
            if len(kept):
                kept_parts.append(batch.select_groups(kept))
                have += len(kept)
        counts["filter/kept"] = have
        counts["filter/refilled"] = max(0, counts["filter/drawn"] - target)
        if self.release_after_rollout:
            gen.release_memory()  # training needs the memory: KV pages, graph pools, a colocated server's
        out = RolloutBatch.concat(kept_parts) if kept_parts else empty_batch(gen.weight_version)
        moments = self.advantages(out)                                                  # 6. advantages
        out.stats = {**counts, **stats, **self.step_stats(drawn, engine_stats, source.task),  # 7. batch
                     **self.total_stats(), **moments}
        if len(out):
            out.stats["rollout/weight_version"] = float(out.weight_version)
        return out

    # ------------------------------------------------------------------ 0. sync
    def sync(self, gen: RolloutGenerator, rl_step: int, policy) -> dict[str, float]:
        """Make ``gen`` hold the policy's weights of ``rl_step`` (every ``sync_every_n_steps``; always at the first
        step of a run, so a resumed run's restored weights reach the generator). Under FSDP the gather is a
        collective: every rank calls this at the same point of the step."""
        if policy is None or self.sync_every == 0 and self._synced:
            return {}
        if self._synced and (rl_step % self.sync_every or gen.weight_version == rl_step):
            return {}
        start = time.perf_counter()
        if gen.reads_weights_of(policy.policy):
            gen.adopt_version(rl_step)  # the engine decodes with the policy itself
        else:
            weights = PolicyWeights(lm=policy.policy, state_dict=policy.gathered_policy_state(),
                                    tokenizer=policy.tokenizer, extra=policy.planner_state())
            trainer = policy.trainer
            if not gen.shared_across_ranks:
                gen.sync_weights(weights, rl_step)
            else:  # rollout servers shared by every rank: rank 0 pushes, the others wait and adopt the version
                if trainer.is_global_zero:
                    gen.sync_weights(weights, rl_step)
                if trainer.world_size > 1:
                    trainer.strategy.barrier("lrl_weight_sync")
                    if not trainer.is_global_zero:
                        gen.adopt_version(rl_step)
        self._synced = True
        return {"timing/sync_s": time.perf_counter() - start, "weight_version": float(rl_step)}

    # ------------------------------------------------------------------ 3.–4. score and shape
    def score(self, batch: RolloutBatch, records: list[dict], task) -> None:
        """Fill accuracy, correct and the shaped rewards of ``batch`` (group i ↔ records[i]), spec §3.1–§3.3."""
        from lrl.algorithms.reward_shaping import apply_length_penalty

        per_row = [records[int(g)] for g in batch.group_index]
        acc = torch.tensor(task.score(batch.texts, per_row), dtype=torch.float32)
        check = getattr(task, "worked_steps_hold", None)  # an optional Task method (the synthetic task's)
        if check is not None:
            hold = torch.tensor([check(t) for t in batch.texts], dtype=torch.bool)
            batch.stats["right_answers_bad_steps"] = float(((acc >= 1.0) & ~hold).sum())
            if self.require_worked_steps:
                acc = torch.where(hold, acc, torch.zeros_like(acc))
        correct = acc >= 1.0
        if self.truncated_is_wrong:
            correct = apply_length_penalty(correct, batch.truncated, enabled=True)
            acc = torch.where(batch.truncated, torch.zeros_like(acc), acc)
        batch.accuracy, batch.correct = acc, correct
        batch.rewards = shape_terms(self.terms, batch, joint=self.joint)

    # ------------------------------------------------------------------ 5. filter
    def filter(self, batch: RolloutBatch, counts: dict[str, float]) -> torch.Tensor:
        """Ids of the kept groups of ``batch``; adds the drops to this step's ``counts`` and the run's totals."""
        if self.group_filter is None:
            kept = torch.arange(batch.num_groups)
        else:
            res = self.group_filter(batch)
            kept = res.kept
            for k in ("dropped_all_wrong", "dropped_tpf_range", "dropped_zero_std"):
                counts[f"filter/{k}"] += getattr(res, k)
                self.totals[k] += int(getattr(res, k))
        self.totals["groups_seen"] += batch.num_groups
        self.totals["groups_kept"] += len(kept)
        return kept

    def total_stats(self) -> dict[str, float]:
        """The filter's counts over the run so far (``filter/total_*``)."""
        out = {f"filter/total_{k}": float(v) for k, v in self.totals.items()}
        out["filter/total_kept_fraction"] = self.totals["groups_kept"] / max(self.totals["groups_seen"], 1)
        return out

    # ------------------------------------------------------------------ 6. advantages
    def advantages(self, out: RolloutBatch) -> dict[str, float]:
        """Fill ``out.advantages`` and return the reward statistics over every rank's kept responses (paper Eq. 7
        normalises over the whole batch). Every rank calls it once per step, with an empty batch too, so the
        collective never waits on a missing rank."""
        from lrl.algorithms.advantages import compute_advantages, global_mean_std

        names = self.reward_names()
        moments = dict(zip(names, global_mean_std([out.rewards.get(k, torch.zeros(0)) for k in names])))
        if not len(out):
            return {}
        _, mean, std, _ = moments["total"]
        out.advantages = compute_advantages(out.rewards["total"], out.group_index, mode=self.advantage,
                                            batch_stats=(mean, std) if self.advantage == "batch" else None)
        stats = {"data/global_responses": float(moments["total"][0])}
        for name, (_, mean, _, pop_std) in moments.items():  # all ranks' responses (population std)
            stats[f"reward/{name}/mean"] = mean
            stats[f"reward/{name}/std"] = pop_std
        return stats

    # ------------------------------------------------------------------ 7. the step's statistics
    def step_stats(self, drawn: list[RolloutBatch], engine_stats: list[dict[str, float]], task) -> dict[str, float]:
        """Cost, diagnostics and verifier counts of every response drawn this step (filtered ones included)."""
        from lrl.rewards.math import reset_timeout_count

        stats = {"reward/timeouts": float(reset_timeout_count())}  # math checks that timed out: never silently 0
        stats.update(self.diagnostics(drawn, task))
        stats.update(spent_counts(drawn))
        if any("right_answers_bad_steps" in b.stats for b in drawn):
            # share of responses whose final answer is right over worked steps that do not hold (garbled work)
            stats["rollout/right_answer_bad_steps"] = (
                sum(b.stats.get("right_answers_bad_steps", 0.0) for b in drawn) / max(1, sum(len(b) for b in drawn))
            )
        stats.update(merge_engine_stats(engine_stats))
        return stats

    def diagnostics(self, batches: list[RolloutBatch], task) -> dict[str, float]:
        """`rollout_diagnostics` of the drawn rollouts (groups renumbered across refill rounds), with the task's
        answer styles when it has them (``Task.response_style``) and the verifier's verdicts once scored."""
        from lrl.metrics.diagnostics import rollout_diagnostics

        batches = [b for b in batches if len(b)]
        if not batches:
            return {}
        offsets = torch.cumsum(torch.tensor([0] + [b.num_groups for b in batches[:-1]]), 0)
        texts = [t for b in batches for t in b.texts]
        classify = getattr(task, "response_style", None)  # an optional Task method
        styles = [classify(t) for t in texts] if classify is not None else None
        # a style outside the task's mix (a `padded` answer from a base that knew it) is logged from its first
        # appearance on, as 0 when absent: Lightning would otherwise repeat its last share at every later step
        self.styles_seen.update(styles or ())
        names = (*getattr(task, "style_names", ()), *sorted(self.styles_seen))
        return rollout_diagnostics(
            texts,
            torch.cat([b.tpf for b in batches]),
            torch.cat([b.num_forwards for b in batches]),
            torch.cat([b.response_lengths for b in batches]),
            torch.cat([b.group_index + o for b, o in zip(batches, offsets.tolist())]),
            styles=styles,
            style_names=tuple(dict.fromkeys(names)),
            correct=torch.cat([b.correct for b in batches]) if all(b.correct is not None for b in batches) else None,
        )


def any_rank(flag: bool, world: int) -> bool:
    """True on every rank when ``flag`` is True on any (an all-reduce MAX; the flag itself with one process)."""
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def merge_engine_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """One step's engine figures over its refill rounds: peaks as maxima, counts as sums, rows as a mean."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out = {}
    for key in parts[0]:
        vals = [p[key] for p in parts if key in p]
        if key.endswith("_gb"):
            out[key] = max(vals)
        elif key == "rollout/rows_per_forward":
            out[key] = sum(vals) / len(vals)
        else:
            out[key] = sum(vals)
    return out


def spent_counts(batches: list[RolloutBatch]) -> dict[str, float]:
    """This rank's rollout cost of one step, every drawn response (filtered groups and refill rounds included),
    in both counts of docs/metrics.md: tokens up to the stop token, denoising forwards in the paper's count and as
    spent (the truncated final block's tail included), store passes apart."""
    tokens = sum(int(b.response_lengths.sum()) for b in batches)
    paper = sum(int(b.num_forwards.sum()) for b in batches)
    spent = sum(int(b.forwards_spent.sum()) for b in batches)
    return {
        "rollout/tokens": float(tokens),
        "rollout/forwards_paper": float(paper),
        "rollout/forwards_spent": float(spent),
        "rollout/store_passes": float(sum(int(b.num_store_passes.sum()) for b in batches)),
        "rollout/tpf_paper": tokens / paper if paper else 0.0,
        "rollout/tpf_spent": tokens / spent if spent else 0.0,
    }


def empty_batch(version: int) -> RolloutBatch:
    """The batch of a step whose groups were all dropped (it still takes part in every collective)."""
    z = torch.zeros(0, dtype=torch.long)
    return RolloutBatch(prompt_ids=[], response_ids=[], texts=[], step_maps=[], num_forwards=z, num_store_passes=z,
                        finish_reasons=[], group_index=z, weight_version=version)
