"""`build_plan`: the per-rank memory of an RL run by component and phase, from its config alone (issue 28).

An RL step goes through phases that do not overlap in time: the rollout (engine weights, KV cache, sampling
transients), the no-grad log-prob passes (old policy, reference), the training forward/backward chunks and, every
few steps, the Pareto evaluation. Model states (weights, optimizer moments, DDP buckets) are alive throughout;
gradients only during training (the module frees them after its last optimizer step). The peak is the states plus
the largest phase. Component formulas: `lrl.plan.components`; shapes: `lrl.plan.shapes`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from lrl.evaluation.config import as_eval_config
from lrl.plan import components as C
from lrl.plan.shapes import ModelShape, load_shape

GB = 1e9
PHASES = ("states", "rollout", "logprob passes", "training", "weight sync", "evaluation")
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


@dataclass
class Row:
    component: str
    phase: str
    bytes: int
    knob: str = ""
    note: str = ""


@dataclass
class MemoryPlan:
    """The plan's rows, the peak (states + the largest phase) and the verdict against ``usable`` bytes."""

    shape: ModelShape
    world_size: int
    device_bytes: int
    usable_bytes: int
    rows: list[Row]
    disk: list[Row] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def phase_bytes(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES[1:], key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes("states") + self.phase_bytes(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.usable_bytes

    def culprit(self) -> Row:
        """The largest component of the peak (states or the peak phase) that has a knob."""
        rows = [r for r in self.rows if r.phase in ("states", self.peak_phase) and r.knob]
        return max(rows, key=lambda r: r.bytes)

    def refusal(self) -> str:
        """The one-line reason a run that does not fit is refused, naming the knob to turn."""
        c = self.culprit()
        return (f"memory plan: {self.peak_bytes / GB:.1f} GB per rank at the {self.peak_phase} peak > "
                f"{self.usable_bytes / GB:.1f} GB usable of {self.device_bytes / GB:.0f} GB; the largest part is "
                f"{c.component} ({c.bytes / GB:.1f} GB): lower {c.knob} (`lrl plan` shows the table; "
                "--skip_plan true runs anyway)")


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _init_args(section: dict | None) -> dict:
    section = section or {}
    return dict(section.get("init_args") or {}) if "class_path" in section else dict(section)


def _strategy(trainer: dict) -> tuple[str, str]:
    """("fsdp" | "ddp" | "single", sharding strategy)."""
    s = trainer.get("strategy", "auto")
    if isinstance(s, dict):
        path = str(s.get("class_path", ""))
        args = s.get("init_args") or {}
        if "FSDP" in path:
            return "fsdp", str(args.get("sharding_strategy", "FULL_SHARD"))
        return ("ddp" if "DDP" in path else "single"), ""
    s = str(s).lower()
    if s.startswith("fsdp"):
        return "fsdp", "FULL_SHARD"
    return ("ddp" if s.startswith("ddp") else "single"), ""


def _precision(precision) -> tuple[int, int, bool]:
    """(parameter bytes, compute bytes, autocast) of a Lightning precision setting."""
    p = str(precision if precision is not None else "32-true")
    if p in ("bf16-mixed", "16-mixed", "bf16", "16"):
        return 4, 2, True
    if p in ("bf16-true", "16-true"):
        return 2, 2, False
    return 4, 4, False


def _lora(m: dict) -> dict | None:
    """``model.init_args.lora`` checked (`lrl.models.lora.lora_settings`) as a dict; None: off."""
    from dataclasses import asdict

    from lrl.models.lora import lora_settings

    value = m.get("lora")
    if value is not None and not isinstance(value, dict):
        value = asdict(value) if hasattr(value, "__dataclass_fields__") else dict(vars(value))
    settings = lora_settings(value)
    return asdict(settings) if settings is not None else None


def build_plan(config: dict, *, world_size: int | None = None, device_gb: float = 80.0, headroom: float = 0.08,
               model_config: str | None = None, shape: ModelShape | None = None) -> MemoryPlan:
    """The memory plan of a `lrl fit` config (the merged YAML, or the CLI's parsed config as a dict).

    Args:
        config: top-level ``checkpoint`` / ``block_size`` and the ``model`` / ``data`` / ``trainer`` sections.
        world_size: ranks (default: ``trainer.devices`` × ``trainer.num_nodes``).
        device_gb: memory of one accelerator in GB (10⁹ bytes).
        headroom: fraction kept free for the CUDA context, the allocator's fragmentation and kernel workspaces.
        model_config: a config.json to take the shape from (default: the checkpoint's, or a known shape).
        shape: the shape itself (tests).
    """
    from datamodules.rollout import RolloutBackend, RolloutDataModule
    from lrl.algorithms.losses import LossConfig
    from lrl.module import LightningRLModule

    model_sec = config.get("model") or {}
    if "LightningRLModule" not in str(model_sec.get("class_path", "lrl.module.LightningRLModule")):
        raise ValueError(f"plan: model.class_path {model_sec.get('class_path')!r} is not an RL module "
                         "(the plan covers lrl.module.LightningRLModule runs)")
    m = {**_defaults(LightningRLModule.__init__), **_init_args(model_sec)}
    d = {**_defaults(RolloutDataModule.__init__), **_init_args(config.get("data"))}
    ro = {**_defaults(RolloutBackend), **(d.get("rollout") or {})}
    t = dict(config.get("trainer") or {})
    checkpoint = config.get("checkpoint") or m.get("checkpoint")
    shape = shape or load_shape(checkpoint, model_config)

    devices = t.get("devices", 1)
    if world_size is None:
        world_size = (int(devices) if str(devices).isdigit() else 1) * int(t.get("num_nodes", 1) or 1)
    strategy, sharding = _strategy(t)
    pb, cb, autocast = _precision(t.get("precision"))
    fsdp = strategy == "fsdp"
    shard = world_size if fsdp and sharding in ("FULL_SHARD", "HYBRID_SHARD") else 1
    grad_shard = world_size if fsdp and sharding != "NO_SHARD" else 1
    gather_b = cb if fsdp else pb  # FSDP's mixed precision gathers in the compute dtype
    residual_b = gather_b if fsdp else pb  # the residual stream follows the parameters' dtype
    block = int(config.get("block_size") or m.get("block_size") or d.get("block_size") or 4)
    lora = _lora(m)
    if lora and fsdp:
        raise ValueError("plan: model.init_args.lora runs without FSDP (one GPU or DDP); drop trainer.strategy=fsdp")
    trainable = C.lora_params(shape, lora["rank"], lora["target_modules"]) if lora else shape.params
    base_b = cb if lora else pb  # LoRA: the frozen base is held in the compute dtype (lrl.models.lora)
    P = shape.params
    rows: list[Row] = []

    # ---- model states (alive throughout)
    rows.append(Row("policy weights", "states", P * base_b // shard + (trainable * pb if lora else 0),
                    "trainer.strategy (FSDP) or model.init_args.lora",
                    f"{P / 1e9:.2f} B params × {base_b} B" + (f" / {shard} ranks" if shard > 1 else "")
                    + (f" (frozen) + {trainable / 1e6:.1f} M adapter params × {pb} B" if lora else "")))
    rows.append(Row("optimizer states (AdamW)", "states", 2 * trainable * pb // grad_shard,
                    "trainer.strategy (FSDP) or model.init_args.lora", f"2 × {trainable / 1e9:.3f} B × {pb} B"))
    if strategy == "ddp":
        rows.append(Row("DDP gradient buckets", "states", trainable * pb, "trainer.strategy (FSDP)",
                        "a second copy of the gradients"))

    # ---- rollout
    native = ro.get("kind", "native") == "native"
    rb = DTYPE_BYTES.get(str(ro.get("dtype")), None) or base_b
    if native:
        if fsdp or rb != base_b:
            # counted in the rollout phase: the copy must be freed around training (release_memory, issue 27)
            note = "engine's own copy in the rollout dtype; assumes release_memory frees it while training"
            rows.append(Row("rollout engine weights", "rollout", P * rb, "data.init_args.rollout.dtype", note))
        else:
            rows.append(Row("rollout engine weights", "rollout", 0, "", "reads the policy's own weights"
                            + (" (adapters applied)" if lora else "")))
        max_new = int(d["max_new_tokens"])
        prompt = int(d.get("max_prompt_tokens") or 1024)
        kv = C.kv_cache_bytes(shape, int(ro["max_rows"]), prompt, max_new, block, rb, ro.get("kv_cache_gb"))
        rows.append(Row("KV cache", "rollout", kv, "data.init_args.rollout.kv_cache_gb",
                        f"{shape.kv_bytes_per_token * rb:,} B/token" +
                        ("" if ro.get("kv_cache_gb") is not None else f", {ro['max_rows']} rows × "
                         f"{C.blocks(prompt + max_new, block)} slots (dense worst case)")))
        rows.append(Row("sampling transients", "rollout", int(float(ro["transient_gb"]) * GB),
                        "data.init_args.rollout.transient_gb", "bound of the engine's per-forward buffers"))
    else:
        rows.append(Row("rollout (SGLang servers)", "rollout", 0, "", "on other GPUs or processes"))

    # ---- log-prob passes and training
    estimator = str(m["estimator"])
    prompt = int(d.get("max_prompt_tokens") or 1024)
    row, n_rows = C.training_row(estimator, prompt, int(d["max_new_tokens"]), block, int(m["max_copies"]),
                                 rounds=block, model_block=block)
    chunk_rows = min(int(m["rows_per_forward"]), int(m["micro_batch_size"]) * n_rows)
    attn = str(m.get("attention", "sdpa"))
    sdpa_mask = attn != "flex"
    fsdp_fwd = (shape.root_params + shape.layer_params) * gather_b if fsdp else 0
    single_step = int(m["ppo_epochs"]) == 1 and int(m["minibatches"]) == 1
    lora_nograd = C.lora_inference_bytes(shape, chunk_rows, row, lora["target_modules"], cb, autocast) if lora else 0
    nograd = C.inference_activation_bytes(shape, chunk_rows, row, compute_bytes=cb, residual_bytes=residual_b,
                                          sdpa_mask=sdpa_mask, lora_bytes=lora_nograd)
    knob_rows = "model.init_args.rows_per_forward"
    # the loss group: defaults for the keys a config leaves out, as the CLI fills them
    kl_beta = m["loss"].kl_beta if isinstance(m["loss"], LossConfig) else LossConfig(**m["loss"]).kl_beta
    if not single_step or kl_beta > 0:
        rows.append(Row("no-grad forward activations", "logprob passes", nograd, knob_rows,
                        f"{chunk_rows} rows × {row.positions:,} positions"))
        if fsdp:
            rows.append(Row("FSDP unit gathers (forward)", "logprob passes", fsdp_fwd, "",
                            "outer unit + one decoder layer"))
    if kl_beta > 0 and lora:
        rows.append(Row("reference weights", "logprob passes", 0, "", "the base: the policy with adapters disabled"))
    elif kl_beta > 0:
        ref_b = DTYPE_BYTES.get(str(m.get("reference_dtype") or ""), cb)
        rows.append(Row("reference weights", "logprob passes", P * ref_b, "model.init_args.loss.kl_beta or lora",
                        f"{ref_b} B/param, on the device for its pass only (CPU between passes)"))
    rows.append(Row("gradients", "training", trainable * pb // grad_shard, "trainer.strategy (FSDP) or lora",
                    f"{trainable / 1e9:.3f} B × {pb} B" + (f" / {grad_shard}" if grad_shard > 1 else "")))
    if fsdp:
        rows.append(Row("FSDP unit gathers (training)", "training",
                        (shape.root_params + 2 * shape.layer_params) * gather_b
                        + max(shape.root_params, shape.layer_params) * gather_b, "",
                        "outer unit + two layers (prefetch) + one unit's unsharded gradient"))
    elif autocast and lora:  # the base is already in the compute dtype: only the adapters are cast
        rows.append(Row("autocast weight casts", "training", trainable * cb, "",
                        "bf16 copies of the adapters (the base is bf16 already)"))
    elif autocast:
        ckpt = bool(m["gradient_checkpointing"])
        casts = (shape.layer_params + shape.root_params) * cb if ckpt else P * cb
        rows.append(Row("autocast weight casts", "training", casts, "model.init_args.gradient_checkpointing",
                        "bf16 copies saved for the backward"))
    lora_pos = (C.lora_layer_bytes_per_position(shape, lora["rank"], lora["target_modules"], lora["dropout"], cb,
                                                autocast) if lora else None)
    act = C.training_activation_bytes(shape, chunk_rows, row, checkpointing=bool(m["gradient_checkpointing"]),
                                      compute_bytes=cb, residual_bytes=residual_b, sdpa_mask=sdpa_mask,
                                      lora_per_position=lora_pos)
    rows.append(Row(f"training activations ({estimator})", "training", act,
                    "model.init_args.rows_per_forward / max_copies / gradient_checkpointing",
                    f"{chunk_rows} rows × {row.positions:,} positions ({row.copies} noisy copies, "
                    f"{'flex' if not sdpa_mask else 'sdpa'}), {n_rows} row(s) per response"))

    callbacks = {str(c.get("class_path", "")).rsplit(".", 1)[-1]: dict(c.get("init_args") or {})
                 for c in (t.get("callbacks") or []) if isinstance(c, dict)}
    # ---- weight sync (`lrl.pipeline.RLStep.sync`, at the next rollout, after the step's gradients are freed): under
    # FSDP every rank gathers the whole state dict in the parameters' dtype (`gathered_policy_state` →
    # get_model_state_dict(full_state_dict=True)); an unsharded policy hands over its own tensors (no copy)
    if fsdp:
        unit = max(shape.root_params, shape.layer_params) * pb  # the unit being unsharded while its copy is made
        rows.append(Row("weight sync: gathered policy", "weight sync", P * pb + unit, "trainer.strategy",
                        f"full state dict, {pb} B/param, on every rank, + one unit unsharded"))

    # ---- evaluation (Pareto sweep through the native engine over the policy's weights; lrl.module.run_pareto)
    if "ParetoFrontierCheckpoint" in callbacks:
        ev = as_eval_config(m.get("eval"))
        if fsdp:
            rows.append(Row("evaluation: gathered policy", "evaluation", P * pb, "trainer.strategy",
                            f"full weights, {pb} B/param (autocast computes in {cb} B)"))
        eval_kv_gb = ev.kv_cache_gb if ev.kv_cache_gb is not None else ro.get("kv_cache_gb")
        eval_rows = int(ev.max_rows or ro["max_rows"])
        kv = C.kv_cache_bytes(shape, eval_rows, prompt, int(ev.max_new_tokens), block, base_b, eval_kv_gb)
        size = callbacks["ParetoFrontierCheckpoint"].get("eval_size") or d.get("eval_size")
        split = f"; {int(size)} records / {world_size} ranks" if size and world_size > 1 else ""
        rows.append(Row("evaluation KV cache", "evaluation", kv, "model.init_args.eval.kv_cache_gb",
                        ("the rollout budget" if ev.kv_cache_gb is None else "its own budget") +
                        ("" if eval_kv_gb is not None else f", {eval_rows} rows (dense worst case)") + split))
        transient = ev.transient_gb if ev.transient_gb is not None else float(ro["transient_gb"])
        rows.append(Row("evaluation transients", "evaluation", int(transient * GB),
                        "model.init_args.eval.transient_gb", "bound of the engine's per-forward buffers"))

    plan = MemoryPlan(shape=shape, world_size=world_size, device_bytes=int(device_gb * GB),
                      usable_bytes=int(device_gb * GB * (1 - headroom)), rows=rows,
                      settings={"strategy": strategy + (f" ({sharding})" if fsdp else ""),
                                "precision": str(t.get("precision")), "estimator": estimator,
                                "block": block, "lora": bool(lora)})
    plan.disk = _disk_rows(shape, trainable, pb, base_b, bool(lora), t, m)
    return plan


def _disk_rows(shape: ModelShape, trainable: int, pb: int, base_b: int, lora: bool, trainer: dict,
               model: dict) -> list[Row]:
    """Bytes on disk: one training checkpoint, one HF export, and what the retention settings keep."""
    weights = trainable * pb if lora else shape.params * pb
    ckpt = weights + 2 * trainable * pb
    out = [Row("one training checkpoint (.ckpt)", "disk", ckpt, "",
               "adapters + their AdamW states" if lora else "weights + AdamW states")]
    export = shape.params * pb  # LoRA: export_policy merges into the base reloaded in float32
    out.append(Row("one HF export (Pareto / export_policy)", "disk", export, "",
                   "merged weights" + ("; a LoRA Pareto save is in the base's dtype" if lora else "")))
    callbacks = {str(c.get("class_path", "")).rsplit(".", 1)[-1]: dict(c.get("init_args") or {})
                 for c in trainer.get("callbacks") or [] if isinstance(c, dict)}
    steps = int(model.get("max_rl_steps") or 0)
    held = 0
    if "RLCheckpoint" in callbacks:  # callbacks.checkpoint.RLCheckpoint: keep_last numbered files + last
        args = callbacks["RLCheckpoint"]
        every = int(args.get("every_n_rl_steps", 10) or 0)
        saves = (steps // every + int(steps % every > 0)) if every and steps else 1  # the final save included
        k = int(args.get("keep_last", 2))
        kept = saves if k < 0 else min(k, saves)
        last = args.get("save_last")
        full_last = last is True or str(last).lower() == "true" or (k == 0 and bool(last))  # "link": a link
        files = kept + int(full_last)
        held += ckpt * (files + 1)  # a save writes the new file before the oldest is deleted
        note = (f"{saves} saves over {steps} RL steps, {'all' if k < 0 else f'the newest {kept}'} kept"
                + (" + last.ckpt (a full copy)" if full_last else " + last.ckpt (a link)" if last else ""))
        out.append(Row("retained training checkpoints", "disk", ckpt * files, "RLCheckpoint.keep_last", note))
    if "ParetoFrontierCheckpoint" in callbacks:  # HF exports of the evaluated policies
        args = callbacks["ParetoFrontierCheckpoint"]
        every = int(args.get("every_n_steps", 10))
        evals = steps // every + int(args.get("evaluate_at_start", True)) if steps else 1
        best = args.get("keep", "frontier") == "best"
        n = 1 if best else evals
        held += export * (n + int(evals > 1))  # the newest export is written before a dominated one is deleted
        out.append(Row("retained Pareto exports", "disk", export * n, "ParetoFrontierCheckpoint.keep",
                       f"{evals} evaluations, " + ("the best-AUP one kept" if best else
                                                   "the frontier kept: at most every one")))
    if held:
        out.append(Row("total over the run (peak)", "disk", held, "",
                       "what is retained + the file being written"))
    return out
