"""`RolloutDataModule`: the prompt state and the loaders of RL training; each step's data comes from `lrl.pipeline`.

It owns the prompt source (a task from `lrl.tasks`), shuffles it per epoch with a seeded generator, builds the
rollout generator (the in-process native engine by default, SGLang when configured) and, once per RL step, runs
`lrl.pipeline.RLStep` (sync → draw → generate → score → shape → filter with refill → advantages → batch; the
paper's Algorithm 1, spec §3). Its state (epoch, cursor, the filter's totals) goes into Lightning checkpoints, and
every random choice derives from ``seed``, that state and `LightningRLModule.rl_step` (the one RL-step counter), so a
resumed run draws exactly the prompts and samples an uninterrupted run would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from lrl.models import load_checkpoint
from lrl.models.lora import MergedWeights, lora_model
from lrl.models.sharding import cast_copy, is_sharded
from lrl.pipeline import GroupFilter, RLStep
from lrl.rewards.terms import RewardTerm
from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch, SamplingParams


@dataclass
class RolloutBackend:
    """Where rollouts come from.

    Args:
        kind: ``native`` (in-process engine on a copy of the policy) or ``sglang`` (HTTP servers).
        max_rows: most rows decoded at once by the native engine.
        dtype: dtype of the native engine's weight copy (e.g. ``bfloat16`` on GPU; None = the policy's).
        progress: show a progress bar during rollouts.
        cuda_graphs: native engine on CUDA: replay its one-block forwards as CUDA graphs (1.8–5× the engine's
            tokens/s at 1–16 rows on an H200, the block forward about the same at 64–128 rows; the engine keeps
            its KV cache between rollouts). See `lrl.models.cuda_graphs`.
        kv_cache_gb: native engine: KV cache budget in GB (10⁹ bytes) per rank. The paged cache holds this many
            bytes of blocks (`lrl.models.paged_kv`); rows are admitted while pages are free. None: enough for
            ``max_rows`` rows at the full generation budget (the dense worst case).
        release_after_rollout: free what the rollout holds (`RolloutGenerator.release_memory`: the native engine's
            kept page pool and CUDA graphs and the allocator's cache; a colocated SGLang server's weights and KV
            cache) once a step's rollouts are done, before training. False keeps CUDA graphs captured between
            steps (faster rollouts, less memory for training).
        transient_gb: native engine: bound on the per-forward transients (sampling over the vocabulary, gathered
            attention keys), in GB; work is split into chunks that fit.
        urls: SGLang server (or router) URLs.
        sglang: extra keyword arguments of `lrl.rollout.sglang_client.SGLangRolloutGenerator`.
    """

    kind: Literal["native", "sglang"] = "native"
    max_rows: int = 512
    dtype: str | None = None
    progress: bool = False
    cuda_graphs: bool = False
    kv_cache_gb: float | None = None
    transient_gb: float = 2.0
    release_after_rollout: bool = True
    urls: list[str] = field(default_factory=list)
    sglang: dict[str, Any] = field(default_factory=dict)


def check_rollout_backend(cfg: RolloutBackend) -> None:
    """Range and type checks of ``data.rollout`` (before anything is built or written)."""
    if cfg.kind not in ("native", "sglang"):
        raise ValueError(f"data.rollout.kind must be 'native' or 'sglang', got {cfg.kind!r}")
    if not isinstance(cfg.max_rows, int) or cfg.max_rows < 1:
        raise ValueError(f"data.rollout.max_rows must be an int >= 1, got {cfg.max_rows!r}")
    dtype = getattr(torch, str(cfg.dtype), None) if cfg.dtype is not None else None
    if cfg.dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"data.rollout.dtype must be a floating-point torch dtype (bfloat16, float16, float32) or "
                         f"null, got {cfg.dtype!r}")
    if cfg.kv_cache_gb is not None and not cfg.kv_cache_gb > 0:
        raise ValueError(f"data.rollout.kv_cache_gb must be > 0 (or null: sized for max_rows), got {cfg.kv_cache_gb}")
    if not cfg.transient_gb > 0:
        raise ValueError(f"data.rollout.transient_gb must be > 0, got {cfg.transient_gb}")
    if cfg.kind == "sglang":
        if not cfg.urls:
            raise ValueError("data.rollout.urls is empty: data.rollout.kind=sglang needs the SGLang server or router "
                             "URL(s)")
        for url in cfg.urls:
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"data.rollout.urls: {url!r} is not an http(s):// URL")


def check_urls_reachable(urls: list[str], within_s: float = 5.0) -> None:
    """Fail naming the URL when a rollout server does not accept a TCP connection within ``within_s`` seconds (an
    unreachable server would otherwise be found only by the first rollout's retries, minutes later)."""
    import socket
    from urllib.parse import urlsplit

    deadline = time.monotonic() + within_s
    for url in urls:
        parts = urlsplit(str(url))
        port = parts.port or (443 if parts.scheme == "https" else 80)
        while True:
            try:
                with socket.create_connection((parts.hostname, port), timeout=max(0.5, deadline - time.monotonic())):
                    break
            except OSError as exc:
                if time.monotonic() >= deadline - 0.5:
                    raise ConnectionError(f"data.rollout.urls: cannot reach {url} ({exc}) within {within_s:g} s; "
                                          "start the server first (scripts/launch_sglang.sh)") from None
                time.sleep(0.5)


def _check_sampling_knobs(*, max_new_tokens, temperature, top_k, top_p, denoising_steps, eval_size, steps_per_epoch,
                          max_prompt_tokens, stop_token_ids) -> None:
    """The rollout's sampling knobs, checked when the config is read (`SamplingParams` checks them only at the first
    rollout, after the run started)."""
    if max_new_tokens < 1:
        raise ValueError(f"data.max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"data.temperature must be > 0 (training rollouts sample), got {temperature}")
    if top_k < 0:
        raise ValueError(f"data.top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"data.top_p must be in (0, 1] (1 = off), got {top_p}")
    if denoising_steps is not None and denoising_steps < 1:
        raise ValueError(f"data.denoising_steps must be >= 1 (or null: the block size), got {denoising_steps}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"data.eval_size must be >= 1 (or null: the whole split), got {eval_size}")
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"data.steps_per_epoch must be >= 1 (or null: one pass over the prompts), got "
                         f"{steps_per_epoch}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"data.max_prompt_tokens must be >= 1 (or null: no limit), got {max_prompt_tokens}")
    if stop_token_ids is not None and any(int(t) < 0 for t in stop_token_ids):
        raise ValueError(f"data.stop_token_ids must be token ids >= 0, got {list(stop_token_ids)}")


class _RolloutStream(IterableDataset):
    """One RL step per item; an epoch ends after ``steps_per_epoch`` items (resumable mid-epoch)."""

    def __init__(self, dm: RolloutDataModule):
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.steps_per_epoch

    def __iter__(self):
        dm = self.dm
        while dm.step_in_epoch < dm.steps_per_epoch and not dm.epoch_used_up():
            yield dm.next_batch()
        dm.start_new_epoch()


class RolloutDataModule(LightningDataModule):
    """Streams reward-scored, filtered rollout batches for `LightningRLModule`.

    Args:
        checkpoint: policy checkpoint (tokenizer source; linked from the top-level ``--checkpoint``).
        block_size: rollout block size (linked; default the checkpoint's).
        mask_token_id: mask id override (linked; checked against the tokenizer by the model layer).
        task: task name in the `lrl.tasks` registry (``synthetic``, ``gsm8k``, ``math``, ``mbpp``, ``humaneval``).
        task_kwargs: keyword arguments of the task (dataset name or local file, field names, sizes, seeds).
        train_split: split the training prompts come from.
        eval_split: held-out split for validation / Pareto evaluation.
        eval_size: number of held-out records evaluated (None: all).
        eval_seed: seed of the held-out set for tasks that generate it (the synthetic task): any unseen seed
            gives a fresh held-out set.
        prompts_per_step: prompt groups per RL step (after filtering and refill).
        group_size: responses per prompt, G (the GRPO group).
        max_new_tokens: generation budget per response; must be a multiple of the block size.
        max_prompt_tokens: prompts longer than this are skipped (counted in ``data/skipped_long_prompts``).
        threshold: confidence threshold of the dynamic strategy during rollouts.
        remasking_strategy: rollout unmasking strategy.
        denoising_steps: steps per block of the static/sequential strategies (default: the block size).
        temperature: rollout sampling temperature.
        top_k: rollout top-k (0 = off).
        top_p: rollout top-p (1 = off).
        eos_policy: ``truncate`` after the stop token, or ``keep_final_block`` (released engine).
        rewards: the reward terms (`lrl.rewards.terms`: ``Accuracy``, ``TPF``, ``PlannerSteps``, ``Distill`` or a
            user's `RewardTerm` subclass by class path), each normalised per prompt group and weighted; the total
            is their sum (docs/rewards.md). None: the paper's ``[Accuracy(normalize=pm1), TPF(normalize=z_score)]``.
        joint_normalization: the ablation of the decoupled normalisation: sum every term's weighted raw value
            (accuracy under ``pm1`` as 2a − 1), then normalise the sum once per group with this mode
            (``z_score``, ``minmax``, ``none``); None: each term normalised on its own (the paper).
        truncated_is_wrong: responses that hit ``max_new_tokens`` count as wrong.
        require_worked_steps: a right final answer counts as correct (accuracy reward and NLL) only when the
            task's check of its worked steps holds (``Task.worked_steps_hold``; the synthetic task): a format
            condition against correct boxes over garbled steps. Evaluation still scores the final answer alone.
        advantage: ``batch`` (paper Eq. 7), ``prompt_group`` or ``prompt_group_center`` (spec §3.5).
        filter: the group filter (`lrl.pipeline.GroupFilter`: ``all_wrong``, ``tpf_range_threshold``, ``zero_std``;
            the paper: ``{all_wrong: true, tpf_range_threshold: 0.01}``); every rule off by default (keep all).
        refill: draw new prompts for filtered groups until the batch is full (paper); False = released code. A step
            never draws a prompt twice (on any rank): refill stops when the split has no unseen prompt left
            (``filter/refill_capped`` = 1).
        max_refill_rounds: bound on rollout rounds per step, the first included. Ranks agree on every round (an
            all-reduce of "need more"), so all of them run the same number of rounds and none waits in a
            collective for more than one round of another rank.
        sync_every_n_steps: the rollout generator takes the policy's weights every this many RL steps (and at the
            first step of a run); 1 keeps rollouts on-policy. Anything else needs ``allow_stale_rollouts`` when the
            generator holds its own weights (SGLang servers, an engine copy in another dtype or under FSDP).
        allow_stale_rollouts: accept rollouts from older weights than the policy's (``sync_every_n_steps`` ≠ 1).
        steps_per_epoch: RL steps per epoch (default: enough steps to visit every training prompt once).
        seed: seed of prompt order and rollout sampling.
        rollout: the rollout backend.
        chat_template: render prompts with the checkpoint's chat template (``tokenizer.apply_chat_template``,
            the task template's user turn, generation prompt on). None: whenever the tokenizer has one; False: the
            task's template string as is (the tiny demo models have no chat template).
        stop_token_ids: token ids that end a response. None: the checkpoint's (generation_config.json's eos ids
            plus the tokenizer's eos, e.g. ``<|im_end|>`` and ``<|endoftext|>`` for SDAR).
    """

    def __init__(
        self,
        checkpoint: str,
        block_size: int | None = None,
        mask_token_id: int | None = None,
        *,
        task: str = "synthetic",
        task_kwargs: dict[str, Any] | None = None,
        train_split: str = "train",
        eval_split: str = "test",
        eval_size: int | None = None,
        eval_seed: int | None = None,
        prompts_per_step: int = 128,
        group_size: int = 32,
        max_new_tokens: int = 256,
        max_prompt_tokens: int | None = 1024,
        threshold: float = 0.9,
        remasking_strategy: Literal["low_confidence_dynamic", "low_confidence_static", "sequential", "planner"] = (
            "low_confidence_dynamic"
        ),
        denoising_steps: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_policy: Literal["truncate", "keep_final_block"] = "truncate",
        rewards: list[RewardTerm] | None = None,
        joint_normalization: Literal["z_score", "minmax", "none"] | None = None,
        truncated_is_wrong: bool = True,
        require_worked_steps: bool = False,
        advantage: Literal["batch", "prompt_group", "prompt_group_center"] = "batch",
        filter: GroupFilter = GroupFilter(),  # noqa: B008 - frozen
        refill: bool = True,
        max_refill_rounds: int = 4,
        sync_every_n_steps: int = 1,
        allow_stale_rollouts: bool = False,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        rollout: RolloutBackend | None = None,
        chat_template: bool | None = None,
        stop_token_ids: list[int] | None = None,
    ):
        super().__init__()
        if group_size < 2:
            raise ValueError(f"data.group_size must be >= 2 for group-normalised rewards, got {group_size}")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1, got {prompts_per_step}")
        if block_size is not None and max_new_tokens % block_size != 0:
            raise ValueError(
                f"data.max_new_tokens={max_new_tokens} must be a multiple of block_size={block_size} "
                "(generation proceeds in whole blocks)"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"data.threshold must be in [0, 1], got {threshold}")
        if max_refill_rounds < 1:
            raise ValueError(f"data.max_refill_rounds must be >= 1, got {max_refill_rounds}")
        if sync_every_n_steps < 0:
            raise ValueError(f"data.init_args.sync_every_n_steps must be >= 0 (0: only at the start), got "
                             f"{sync_every_n_steps}")
        if sync_every_n_steps != 1 and (rollout or RolloutBackend()).kind == "sglang" and not allow_stale_rollouts:
            raise ValueError(stale_rollouts_error(sync_every_n_steps, "the SGLang servers"))
        _check_sampling_knobs(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              denoising_steps=denoising_steps, eval_size=eval_size, steps_per_epoch=steps_per_epoch,
                              max_prompt_tokens=max_prompt_tokens, stop_token_ids=stop_token_ids)
        check_rollout_backend(rollout or RolloutBackend())
        from lrl.tasks.registry import check_task_args

        check_task_args(task, dict(task_kwargs or {}))  # early: a task is built only in setup()
        if eval_seed is not None:
            check_task_args(task, {"eval_seed": eval_seed}, key="data.eval_seed (null for a fixed eval split)")
        self.rollout_cfg = rollout or RolloutBackend()
        self.pipeline = RLStep(rewards=rewards, group_filter=filter, advantage=advantage,
                               prompts_per_step=prompts_per_step, refill=refill, max_refill_rounds=max_refill_rounds,
                               joint_normalization=joint_normalization, truncated_is_wrong=truncated_is_wrong,
                               require_worked_steps=require_worked_steps, seed=seed,
                               sync_every_n_steps=sync_every_n_steps,
                               release_after_rollout=self.rollout_cfg.release_after_rollout)
        self.reward_terms = self.pipeline.terms
        # the config file keeps these; objects (a loaded teacher) are no hyperparameters
        self.save_hyperparameters(ignore=["rollout", "rewards", "filter"])
        self.checkpoint = checkpoint
        self.block_size = block_size
        self.generator: RolloutGenerator | None = None
        self.task = None
        self.tokenizer = None
        self.train_records: list[dict] = []
        self.eval_records: list[dict] = []
        self.epoch = 0
        self.cursor = 0
        self.step_in_epoch = 0
        self._order: list[int] | None = None
        self.skipped_long = 0
        self._steps_per_epoch = steps_per_epoch
        self.stop_ids: tuple[int, ...] = ()

    # ------------------------------------------------------------------ setup
    def check_device(self, device: torch.device | None) -> None:
        """Refuse rollout options the training device cannot run (None: not known yet)."""
        cfg = self.rollout_cfg
        if cfg.kind == "native" and cfg.cuda_graphs and device is not None and device.type != "cuda":
            raise ValueError(f"data.rollout.cuda_graphs=true needs the policy on a CUDA device (the trainer runs on "
                             f"{device}): use trainer.accelerator=gpu or set it false")

    def setup(self, stage: str | None = None) -> None:
        from lrl.models import load_tokenizer
        from lrl.tasks import get_task

        if self.task is None:
            kwargs = dict(self.hparams.task_kwargs or {})
            if self.hparams.eval_seed is not None:
                kwargs["eval_seed"] = self.hparams.eval_seed
            self._check_against_checkpoint()
            if self.rollout_cfg.kind == "sglang":
                check_urls_reachable(self.rollout_cfg.urls)
            self.task = get_task(self.hparams.task, **kwargs)
            self.tokenizer = load_tokenizer(self.checkpoint)
            self._use_checkpoint_generation_settings()
            if self.hparams.require_worked_steps and not hasattr(self.task, "worked_steps_hold"):
                raise ValueError(
                    f"data.require_worked_steps=true but task {self.hparams.task!r} has no check of worked steps "
                    "(the synthetic task has one)"
                )
        self.check_device(getattr(getattr(self.trainer, "strategy", None), "root_device", None))
        if stage in (None, "fit") and not self.train_records:
            self.train_records = self._fit_prompts(self.task.load(self.hparams.train_split))
            if not self.train_records:
                raise ValueError(f"task {self.hparams.task!r} split {self.hparams.train_split!r} has no usable prompts")
            self.check_prompt_supply()
        if not self.eval_records:
            try:
                recs = self.task.load(self.hparams.eval_split)
            except ValueError:
                recs = []
            self.eval_records = recs[: self.hparams.eval_size] if self.hparams.eval_size else recs

    def _check_against_checkpoint(self) -> None:
        """Stop ids inside the vocabulary and the generation budget inside the model's context (config.json)."""
        from lrl.models.loading import read_config

        raw = read_config(self.checkpoint)
        vocab, context = raw.get("vocab_size"), raw.get("max_position_embeddings")
        bad = [t for t in self.hparams.stop_token_ids or () if vocab is not None and not 0 <= int(t) < int(vocab)]
        if bad:
            raise ValueError(f"data.stop_token_ids {bad} lie outside the vocabulary of {self.checkpoint} "
                             f"(vocab_size {vocab})")
        if context is not None and self.hparams.max_new_tokens > int(context):
            raise ValueError(f"data.max_new_tokens={self.hparams.max_new_tokens} exceeds the context of "
                             f"{self.checkpoint} (max_position_embeddings {context})")

    def _use_checkpoint_generation_settings(self) -> None:
        """Chat template and stop tokens from the checkpoint unless the config says otherwise."""
        from lrl.models.generation import checkpoint_stop_ids, has_chat_template

        chat = self.hparams.chat_template
        if chat and not has_chat_template(self.tokenizer):
            raise ValueError(f"data.chat_template=true but the tokenizer of {self.checkpoint} has no chat template")
        if chat or (chat is None and has_chat_template(self.tokenizer)):
            self.task.use_chat_template(self.tokenizer)
        self.stop_ids = checkpoint_stop_ids(self.checkpoint, self.tokenizer, self.hparams.stop_token_ids)

    def _fit_prompts(self, records: list[dict]) -> list[dict]:
        limit = self.hparams.max_prompt_tokens
        if limit is None:
            return records
        keep = [
            r for r in records if len(self.tokenizer(self.task.prompt(r), add_special_tokens=False).input_ids) <= limit
        ]
        self.skipped_long = len(records) - len(keep)
        return keep

    @property
    def steps_per_epoch(self) -> int:
        """RL steps per epoch. Given (``data.steps_per_epoch``): exactly that many, the prompt order wrapping
        around within the epoch when refills draw more. Default: at most ⌊prompts / (prompts_per_step · ranks)⌋
        (refill-free steps); refill draws use up the epoch's prompts sooner and it ends early, when the next step
        could not draw ``prompts_per_step`` unseen prompts (`epoch_used_up`): every prompt at most once an epoch."""
        if self._steps_per_epoch is not None:
            return self._steps_per_epoch
        n = max(1, len(self.train_records))
        return max(1, n // (self.hparams.prompts_per_step * self.rank_world()[1]))

    def _prompts_per_rank(self) -> int:
        """Draws one step may make per rank without any prompt drawn twice in the step (by this or another rank)."""
        return len(self.train_records) // self.rank_world()[1]

    def epoch_used_up(self) -> bool:
        """Default epoch length only: the next step's first round would reach a prompt this epoch already drew."""
        if self._steps_per_epoch is not None or self.step_in_epoch == 0:
            return False
        return (self.cursor + self.hparams.prompts_per_step) * self.rank_world()[1] > len(self.train_records)

    def check_prompt_supply(self) -> None:
        """A step's first round must fit the split without repeating a prompt across this step's ranks."""
        rank, world = self.rank_world()
        n, pps = len(self.train_records), self.hparams.prompts_per_step
        if pps * world > n:
            raise ValueError(f"data.prompts_per_step={pps} × {world} rank(s) needs at least {pps * world} training "
                             f"prompts, but task {self.hparams.task!r} split {self.hparams.train_split!r} has {n}: "
                             "lower it or use more prompts")

    def sampling_params(self, block_size: int, seed: int) -> SamplingParams:
        hp = self.hparams
        return SamplingParams(
            block_size=block_size,
            remasking_strategy=hp.remasking_strategy,
            threshold=hp.threshold,
            denoising_steps=hp.denoising_steps or block_size,
            temperature=hp.temperature,
            top_k=hp.top_k,
            top_p=hp.top_p,
            greedy=False,
            max_new_tokens=hp.max_new_tokens,
            stop_token_ids=self.stop_ids,
            samples_per_prompt=hp.group_size,
            seed=seed,
            eos_policy=hp.eos_policy,
        )

    def _build_generator(self) -> RolloutGenerator:
        cfg = self.rollout_cfg
        if cfg.kind == "sglang":
            from lrl.rollout.sglang_client import SGLangRolloutGenerator

            if not cfg.urls:
                raise ValueError("data.rollout.urls is empty: give the SGLang server or router URL(s)")
            return SGLangRolloutGenerator(cfg.urls, self.checkpoint, **cfg.sglang)
        from lrl.rollout.engine import NativeEngine

        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "policy", None) is None:
            raise RuntimeError("the native rollout engine needs the policy of a LightningRLModule")
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        if is_sharded(module.policy):
            # a sharded policy cannot be deep-copied: the architecture in the rollout dtype straight from disk
            # (never a float32 copy on the device); the pipeline's sync then pushes the full weights
            hp = module.hparams
            lm, _ = load_checkpoint(hp.checkpoint, mask_token_id=hp.mask_token_id, attention=hp.attention,
                                    dtype=dtype)
            lm.to(module.device).eval().requires_grad_(False)
        elif dtype is None or dtype == module.policy.dtype:
            # the engine reads the policy's own weights: no copy at all (issue 28); LoRA: adapters applied
            lm = module.policy
        else:  # the copy the config asks for, built tensor by tensor (LoRA: merged W + BA, the policy untouched)
            lora = lora_model(module.policy) is not None
            lm = cast_copy(module.policy, dtype,
                           source=MergedWeights(module.policy.model, buffers=True) if lora else None)
        own_copy = lm is not module.policy and lm.device.type == "cuda"  # offloaded while the policy trains
        return NativeEngine(lm, module.tokenizer, max_rows=cfg.max_rows, progress=cfg.progress,
                            cuda_graphs=cfg.cuda_graphs, kv_cache_gb=cfg.kv_cache_gb, transient_gb=cfg.transient_gb,
                            offload_weights=own_copy and cfg.release_after_rollout)

    def get_generator(self) -> RolloutGenerator:
        if self.generator is None:
            self.generator = self._build_generator()
            self._check_on_policy(self.generator)
        return self.generator

    def _module(self):
        """The `LightningRLModule` being trained (the source of `rl_step` and of the weights), or None when this
        data module is used on its own."""
        return getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None

    def _check_on_policy(self, gen: RolloutGenerator) -> None:
        """Refuse a generator with its own weights that would not take the policy's every step, before its first
        rollout (`allow_stale_rollouts` is the explicit opt-out)."""
        every = self.hparams.sync_every_n_steps
        module = self._module()
        if every == 1 or self.hparams.allow_stale_rollouts or module is None or gen.reads_weights_of(module.policy):
            return
        raise ValueError(stale_rollouts_error(every, f"the rollout generator's own weights ({type(gen).__name__})"))

    # ------------------------------------------------------------------ data order and state
    def _epoch_order(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.train_records), generator=g).tolist()
        return self._order

    def rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def draw(self, n: int) -> list[dict]:
        """Next n prompts of this epoch's permutation; with several ranks, rank r takes every world-th prompt
        (the cursor counts draws per rank, so all ranks advance in step and never share a prompt)."""
        order = self._epoch_order()
        rank, world = self.rank_world()
        out = []
        for _ in range(n):
            out.append(self.train_records[order[(self.cursor * world + rank) % len(order)]])
            self.cursor += 1
        return out

    def draws_left(self) -> int:
        """Draws the next step may make on this rank before a prompt would repeat: within the step, and with the
        default epoch length within the epoch."""
        return self._prompts_per_rank() - (self.cursor if self._steps_per_epoch is None else 0)

    def rollout_sampling(self, gen: RolloutGenerator, seed: int) -> SamplingParams:
        return self.sampling_params(self.block_size or gen_block_size(gen), seed)

    def start_new_epoch(self) -> None:
        self.epoch += 1
        self.cursor = 0
        self.step_in_epoch = 0
        self._order = None

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "step_in_epoch": self.step_in_epoch,
            "filter_totals": dict(self.pipeline.totals),
        }

    def load_state_dict(self, state: dict) -> None:
        # checkpoints before the single RL-step counter also hold "rl_step" (= the module's): not needed
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.pipeline.totals.update({k: int(v) for k, v in state.get("filter_totals", {}).items()})
        self._order = None

    # ------------------------------------------------------------------ one RL step of data
    def next_batch(self, rl_step: int | None = None) -> RolloutBatch:
        """This RL step's batch (`lrl.pipeline.RLStep.run`); ``rl_step`` defaults to the module's
        (`LightningRLModule.rl_step`; 0 for a data module used on its own)."""
        module = self._module()
        if rl_step is None:
            rl_step = module.rl_step if module is not None else 0
        out = self.pipeline.run(self, self.get_generator(), rl_step, policy=module)
        self.step_in_epoch += 1
        if len(out):
            out.stats["data/epoch"] = float(self.epoch)
            out.stats["data/skipped_long_prompts"] = float(self.skipped_long)
        return out

    def sync_generator(self) -> None:
        """Give the rollout generator the policy's current weights now. Every step does this before its rollouts
        (`lrl.pipeline.RLStep.sync`), so the generator holds the weights its last rollout used; call this after
        training to have it hold the trained ones (on every rank: under FSDP the gather is a collective)."""
        module = self._module()
        if module is not None:
            self.pipeline.sync(self.get_generator(), module.rl_step, module)

    def reward_names(self) -> list[str]:
        """The reward components every batch carries, in a fixed order (the same on every rank)."""
        return self.pipeline.reward_names()

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RolloutStream(self), batch_size=None, collate_fn=_identity, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        if not self.eval_records:
            raise ValueError(f"task {self.hparams.task!r} has no records in split {self.hparams.eval_split!r}")
        batch = {"task": self.task, "records": self.eval_records, "stop_token_ids": self.stop_ids}
        return DataLoader([batch], batch_size=None, collate_fn=_identity)

    test_dataloader = val_dataloader


def gen_block_size(gen: RolloutGenerator) -> int:
    lm = getattr(gen, "lm", None)
    if lm is None:
        raise ValueError("block_size must be set when the rollout generator has no local model (e.g. SGLang)")
    return lm.bd.block_size


def stale_rollouts_error(every: int, holder: str) -> str:
    return (f"data.init_args.sync_every_n_steps={every} leaves {holder} on older weights than the policy "
            "(off-policy rollouts): set it to 1, or data.init_args.allow_stale_rollouts=true to mean it")


def _identity(x):
    return x
