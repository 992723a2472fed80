"""The typed records that cross from rollout to training: `SamplingParams` in, `RolloutBatch` out.

`RolloutBatch` is the single record that travels rollout → rewards → filters → training (spec §2.5, §3).
Ragged per-response data (ids, step maps) are Python lists; per-response scalars are 1-D tensors of length N.
Reward/advantage fields are empty after generation and filled in by the datamodule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch

RemaskingStrategy = Literal["low_confidence_dynamic", "low_confidence_static", "sequential", "planner"]
EosPolicy = Literal["truncate", "keep_final_block"]


@dataclass
class SamplingParams:
    """How one rollout call decodes (spec §2.2–§2.4).

    Args:
        block_size: Tokens per diffusion block; blocks are aligned to absolute positions of the row.
        remasking_strategy: ``low_confidence_dynamic`` (unmask the most confident masked position plus every masked
            position with confidence >= ``threshold``), ``low_confidence_static`` (top-k by confidence,
            k = max(1, block_size // denoising_steps)), ``sequential`` (next k positions left to right) or
            ``planner`` (dUltra: the model's planner head decides, `lrl.rollout.unmasking.planner_decisions`;
            native engine only).
        threshold: Confidence threshold of the dynamic strategy, in [0, 1].
        denoising_steps: Denoising steps per block for the static and sequential strategies.
        temperature: Softmax temperature; confidence is the sampled token's probability at this temperature.
        top_k: Keep the k most likely tokens when sampling (0 = whole vocabulary).
        top_p: Nucleus sampling mass (1.0 = off).
        greedy: Argmax decoding (evaluation); temperature/top-k/top-p are then ignored for the token choice.
        max_new_tokens: Generation budget per response, counted from the end of the prompt.
        stop_token_ids: Ids that end a response (checked when a block is fully unmasked).
        samples_per_prompt: Responses per prompt (the GRPO group size G).
        seed: Seed of the sampling generator; the same seed gives the same tokens.
        planner_threshold: Greedy ``planner`` decoding unmasks positions with p_i >= this (sampling draws
            Bernoulli(p_i) instead).
        eos_policy: ``truncate`` returns tokens up to and including the stop token (upstream lmdeploy);
            ``keep_final_block`` returns the whole final block, as the released LightningRL engine does.
    """

    block_size: int = 32
    remasking_strategy: RemaskingStrategy = "low_confidence_dynamic"
    threshold: float = 0.9
    denoising_steps: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    samples_per_prompt: int = 1
    seed: int = 0
    eos_policy: EosPolicy = "truncate"
    planner_threshold: float = 0.5

    def __post_init__(self) -> None:
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        if self.block_size <= 0:
            raise ValueError(f"SamplingParams.block_size must be > 0, got {self.block_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"SamplingParams.threshold must be in [0, 1], got {self.threshold}")
        if self.denoising_steps <= 0:
            raise ValueError(f"SamplingParams.denoising_steps must be > 0, got {self.denoising_steps}")
        if self.samples_per_prompt < 1:
            raise ValueError(
                f"SamplingParams.samples_per_prompt (group size) must be >= 1, got {self.samples_per_prompt}"
            )
        if self.max_new_tokens <= 0:
            raise ValueError(f"SamplingParams.max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature must be > 0 when greedy=False, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.planner_threshold <= 1.0:
            raise ValueError(f"SamplingParams.planner_threshold must be in [0, 1], got {self.planner_threshold}")
        if self.remasking_strategy not in ("low_confidence_dynamic", "low_confidence_static", "sequential", "planner"):
            raise ValueError(f"SamplingParams.remasking_strategy: unknown {self.remasking_strategy!r}")
        if self.eos_policy not in ("truncate", "keep_final_block"):
            raise ValueError(f"SamplingParams.eos_policy: unknown {self.eos_policy!r}")

    def tokens_per_step(self) -> int:
        """k of the static and sequential strategies."""
        return max(1, self.block_size // self.denoising_steps)


@dataclass
class RolloutBatch:
    """N responses (G per prompt group), ordered group by group.

    Rollout fields (filled by every generator):
        prompt_ids: N lists of prompt token ids.
        response_ids: N lists of generated ids, up to and including the stop token (or the whole final block
            under ``eos_policy="keep_final_block"``).
        texts: N decoded responses (special tokens skipped).
        step_maps: N lists, same length as ``response_ids``: the 1-based denoising forward that unmasked each
            token. Store passes are not counted (spec §2.5).
        num_forwards: (N,) long, denoising forwards per response in the paper's count (= number of distinct step ids
            of the returned tokens; `forwards_spent` adds the truncated tail's).
        num_store_passes: (N,) long, KV store passes per response (reported, not counted in TPF).
        finish_reasons: N strings, ``"stop"`` or ``"length"``.
        group_index: (N,) long, index of the prompt (group) each response belongs to, 0..num_groups-1.
        weight_version: version of the weights that produced the rollout.
        sampling_logprobs: N lists aligned with ``response_ids``: the log-probability each token was drawn with
            (softmax of logits / T restricted to the top-k / top-p support; greedy: plain log-softmax), or None
            when the generator cannot report them.
        tail_ids, tail_step_maps: N lists (empty unless ``eos_policy="truncate"`` stopped mid-block): the final
            block's positions after the stop token, as the rollout decoded them, and their step ids. Training only
            (exact replay of the final block); texts, rewards, lengths and TPF ignore them.
        sampling: the `SamplingParams` of the rollout (training scores tokens under the same temperature, top-k
            and top-p); None when unknown.
        planner_logprobs: ``planner`` rollouts only (else None): N lists, entry s − 1 the log-probability of the
            unmasking decisions of step s (`lrl.rollout.unmasking.planner_logprob`), for every step of the
            response's blocks (tail included). The decisions themselves are the step maps: at step s of a block the
            masked set is {i : step_i >= s} and u_i = [step_i == s].
    Training fields (filled by rewards/filters, spec §3):
        correct: (N,) bool verifier outcome; accuracy: (N,) float (bool or code pass rate);
        rewards: name -> (N,) float, raw and normalized rewards; advantages: (N,) float.
        prompts / ground_truths: optional per-group task data (length num_groups) for scoring and logging.
        stats: scalar diagnostics of how the batch was made (timings, filter counts), logged by the trainer.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    step_maps: list[list[int]]
    num_forwards: torch.Tensor
    num_store_passes: torch.Tensor
    finish_reasons: list[str]
    group_index: torch.Tensor
    weight_version: int = 0
    sampling_logprobs: list[list[float]] | None = None
    tail_ids: list[list[int]] = field(default_factory=list)
    tail_step_maps: list[list[int]] = field(default_factory=list)
    sampling: SamplingParams | None = None
    planner_logprobs: list[list[float]] | None = None
    correct: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    advantages: torch.Tensor | None = None
    prompts: list[str] | None = None
    ground_truths: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if not self.tail_ids and not self.tail_step_maps:
            self.tail_ids, self.tail_step_maps = [[] for _ in range(n)], [[] for _ in range(n)]
        for name in ("prompt_ids", "texts", "step_maps", "finish_reasons", "tail_ids", "tail_step_maps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {n}")
        for name in ("num_forwards", "num_store_passes", "group_index"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"RolloutBatch.{name} must have shape ({n},), got {tuple(getattr(self, name).shape)}")
        for i, (ids, sm) in enumerate(zip(self.response_ids, self.step_maps)):
            if len(ids) != len(sm):
                raise ValueError(f"RolloutBatch response {i}: {len(ids)} ids but {len(sm)} step-map entries")
        for i, (ids, sm) in enumerate(zip(self.tail_ids, self.tail_step_maps)):
            if len(ids) != len(sm):
                raise ValueError(f"RolloutBatch response {i}: {len(ids)} tail ids but {len(sm)} tail step ids")
        if self.sampling_logprobs is not None:
            if len(self.sampling_logprobs) != n:
                raise ValueError(f"RolloutBatch.sampling_logprobs has {len(self.sampling_logprobs)} entries, "
                                 f"expected {n}")
            for i, (ids, lp) in enumerate(zip(self.response_ids, self.sampling_logprobs)):
                if len(ids) != len(lp):
                    raise ValueError(f"RolloutBatch response {i}: {len(ids)} ids but {len(lp)} sampling log-probs")
        if self.planner_logprobs is not None and len(self.planner_logprobs) != n:
            raise ValueError(f"RolloutBatch.planner_logprobs has {len(self.planner_logprobs)} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_groups(self) -> int:
        return int(self.group_index.max().item()) + 1 if len(self) else 0

    # Counting (spec §2.5; docs/metrics.md says which count every logged key and table uses):
    #   tokens  = `response_lengths`: generated ids up to and including the stop token. Under
    #             eos_policy="keep_final_block" the final block's filler after the stop token is returned (and
    #             trained on) but not counted: it is not part of the answer (the released code cuts the text at
    #             <|im_end|> before counting, spec §2.5).
    #   forwards, paper = `num_forwards`: distinct step ids of the returned tokens, len(set(step_map)).
    #   forwards, spent = `forwards_spent`: distinct step ids of the returned tokens and of the final block's tail
    #             that truncate decoded after the stop token (`tail_step_maps`): every denoising forward that ran for
    #             the response. Store passes (`num_store_passes`) are counted by neither.
    def stop_index(self, i: int) -> int | None:
        """Position in ``response_ids[i]`` of its first stop token (``sampling.stop_token_ids``), or None when the
        response did not stop or the stop ids are unknown."""
        if self.finish_reasons[i] != "stop" or self.sampling is None or not self.sampling.stop_token_ids:
            return None
        stops = set(self.sampling.stop_token_ids)
        return next((k for k, t in enumerate(self.response_ids[i]) if t in stops), None)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) long: tokens of each response up to and including its stop token (filler after it, which
        ``keep_final_block`` returns, is not counted); the whole response when it did not stop."""
        out = []
        for i, ids in enumerate(self.response_ids):
            k = self.stop_index(i)
            out.append(len(ids) if k is None else k + 1)
        return torch.tensor(out, dtype=torch.long)

    @property
    def returned_lengths(self) -> torch.Tensor:
        """(N,) long: ids returned per response (``len(response_ids[i])``, filler after the stop token included)."""
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    @property
    def forwards_spent(self) -> torch.Tensor:
        """(N,) long: denoising forwards that ran for each response: distinct step ids of ``step_maps`` and
        ``tail_step_maps`` together (store passes excluded). Under ``truncate`` the forwards that decoded only
        positions after the stop token count here and not in ``num_forwards``; otherwise the two agree."""
        return torch.tensor([len({s for s in (*sm, *tail) if s > 0}) for sm, tail in
                             zip(self.step_maps, self.tail_step_maps)], dtype=torch.long)

    @property
    def tpf(self) -> torch.Tensor:
        """(N,) float: per-response tokens per forward in the paper's count (``response_lengths`` ÷
        ``num_forwards``), 0 where a response has no forward (spec §2.5; the speed reward, §3.2)."""
        return _ratio(self.response_lengths, self.num_forwards)

    @property
    def tpf_spent(self) -> torch.Tensor:
        """(N,) float: ``response_lengths`` ÷ ``forwards_spent`` (0 where no forward ran)."""
        return _ratio(self.response_lengths, self.forwards_spent)

    @property
    def batch_tpf(self) -> float:
        """Σ tokens ÷ Σ forwards (paper count) over the batch (a ratio of sums, as the evaluation reports it)."""
        total = int(self.num_forwards.sum())
        return float(self.response_lengths.sum()) / total if total else 0.0

    @property
    def batch_tpf_spent(self) -> float:
        """Σ tokens ÷ Σ spent forwards over the batch."""
        total = int(self.forwards_spent.sum())
        return float(self.response_lengths.sum()) / total if total else 0.0

    @property
    def truncated(self) -> torch.Tensor:
        """(N,) bool: responses that hit max_new_tokens."""
        return torch.tensor([r == "length" for r in self.finish_reasons], dtype=torch.bool)

    def select(self, rows: torch.Tensor | list[int]) -> RolloutBatch:
        """A new batch with the given response rows (order kept)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        ids = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("prompts", "ground_truths", "weight_version", "stats", "sampling"):
                out[f.name] = v
            elif isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx] for k, t in v.items()}
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in ids]
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def select_groups(self, groups: torch.Tensor | list[int]) -> RolloutBatch:
        """Keep whole prompt groups; groups are renumbered 0..k-1 in the order given."""
        groups = torch.as_tensor(groups, dtype=torch.long)
        rows = [i for g in groups.tolist() for i in (self.group_index == g).nonzero().flatten().tolist()]
        out = self.select(rows)
        remap = {int(g): k for k, g in enumerate(groups.tolist())}
        out.group_index = torch.tensor([remap[int(g)] for g in out.group_index], dtype=torch.long)
        if self.prompts is not None:
            out.prompts = [self.prompts[g] for g in groups.tolist()]
        if self.ground_truths is not None:
            out.ground_truths = [self.ground_truths[g] for g in groups.tolist()]
        return out

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """Concatenate batches, offsetting group indices so groups stay distinct."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        offset, parts = 0, []
        for b in batches:
            parts.append(replace(b, group_index=b.group_index + offset))
            offset += b.num_groups
        first = parts[0]
        out = {}
        for f in fields(first):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "weight_version":
                out[f.name] = min(vals)
            elif f.name == "stats":
                out[f.name] = {k: v for d in vals for k, v in d.items()}
            elif f.name in ("prompts", "ground_truths", "sampling_logprobs", "planner_logprobs"):
                out[f.name] = None if any(v is None for v in vals) else [x for v in vals for x in v]
            elif f.name == "sampling":
                out[f.name] = _common_sampling(vals)
            elif isinstance(vals[0], torch.Tensor):
                out[f.name] = torch.cat(vals)
            elif vals[0] is None:
                out[f.name] = None
            elif isinstance(vals[0], dict):
                keys = set(vals[0]).intersection(*vals[1:]) if len(vals) > 1 else set(vals[0])
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in keys}
            else:
                out[f.name] = [x for v in vals for x in v]
        return RolloutBatch(**out)


def _ratio(tokens: torch.Tensor, forwards: torch.Tensor) -> torch.Tensor:
    f = forwards.to(torch.float32)
    return torch.where(f > 0, tokens.float() / f.clamp(min=1), torch.zeros_like(f))


def _common_sampling(vals: list[SamplingParams | None]) -> SamplingParams | None:
    """The sampling params of concatenated batches: they must share the distribution training scores under."""
    if any(v is None for v in vals):
        return None
    dist = {(v.greedy, v.temperature, v.top_k, v.top_p) for v in vals}
    if len(dist) > 1:
        raise ValueError(f"RolloutBatch.concat: batches sampled with different (greedy, temperature, top_k, top_p) "
                         f"{sorted(dist)} cannot be trained as one batch")
    return vals[0]
