"""Two RL steps of `lrl fit` at the SDAR-1.7B shape (real Qwen3 vocabulary, random weights) on one GPU, with the
measured memory peak of every phase against the memory plan (`lrl plan`, docs/memory.md; issue 28).

    python scripts/gpu_plan_check.py --out outputs/gpu/plan_1p7b          # on a GPU: the shipped 1-GPU config
    python scripts/gpu_plan_check.py --prompts-per-step 1 --group-size 2   # fewer responses, same peaks (see below)
    python scripts/gpu_plan_check.py --smoke --out /tmp/plan_smoke         # tiny shape on CPU: checks the script

Steps: (a) write an SDAR-format checkpoint at the SDAR-1.7B shape (hidden 2048, 28 layers, 16/8 heads, MLP 6144,
151,936-row tied embedding; `lrl.models.sdar_like`) or use ``--checkpoint``; (b) run ``lrl fit --config
configs/sdar_1p7b_1gpu.yaml`` in-process on the synthetic task for ``model.init_args.max_rl_steps`` = 2 (no Pareto
evaluation, no checkpoints, no filter: a random model is never right) with a callback that measures each phase's
peak; (c) build the plan of the same merged config (at the prompt length the run saw) and print/write the table.

Measured, per phase (the peak of the phase's calls over both steps; the allocator's peak statistics are reset at
every phase start): rollout (`RLStep.run` less its weight sync), weight sync (`RLStep.sync`), log-prob passes
(old and reference, `_step_inputs`), training (`_minibatch_step`), and states (tensors alive between the steps).
On CUDA a figure is ``torch.cuda.max_memory_allocated``; on CPU (``--smoke``) the live tensor bytes at the phase
start (every tensor the garbage collector sees) plus `lrl.plan.measure.LiveTensorBytes`' peak inside the phase.
Planned = states + the phase's rows (the plan's peak formula). The rollout's KV cache is a fixed budget and the
training/log-prob chunks are ``rows_per_forward`` rows whatever the batch, so fewer prompts keep the peaks (and
shorten the run). A phase that runs out of memory is reported as ``oom``, not raised.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
PHASES = ("states", "rollout", "weight sync", "logprob passes", "training")
SDAR_1P7B = dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
                 max_position_embeddings=32768)
SMOKE_SHAPE = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96,
                   max_position_embeddings=1024)
TOLERANCE = 0.15


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can see (CPU: what is alive right now)."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some library objects warns of deprecations
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "meta" or obj.is_sparse:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - exotic tensor subclasses without a plain storage
            continue
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


class PhasePeaks(Callback):
    """Wraps the RL step's phase methods on the module and the data module's pipeline and records each phase's
    peak bytes per RL step (``self.peaks[phase]``: a list of (rl_step, bytes)). A phase entered inside another
    (the weight sync inside a rollout) closes the outer one's segment and reopens it afterwards, so neither
    counts the other."""

    def __init__(self):
        self.peaks: dict[str, list[tuple[int, int]]] = {p: [] for p in PHASES}
        self.oom: str | None = None
        self.prompt_tokens = 0
        self.first_prompt_ids: list[int] = []
        self._stack: list[list] = []  # [phase, peak so far, open CPU mode or None]
        self._module = None

    # ---------------------------------------------------------------- measuring
    def _cuda(self) -> bool:
        return self._device.type == "cuda"

    def _open(self, entry: list) -> None:
        if self._cuda():
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            entry[2] = None
        else:
            from lrl.plan.measure import LiveTensorBytes

            base = _live_tensor_bytes()
            mode = LiveTensorBytes()
            mode.__enter__()
            entry[2] = (mode, base)

    def _close(self, entry: list) -> None:
        if self._cuda():
            torch.cuda.synchronize(self._device)
            peak = torch.cuda.max_memory_allocated(self._device)
        else:
            mode, base = entry[2]
            mode.__exit__(None, None, None)
            peak = base + mode.peak
        entry[1] = max(entry[1], peak)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self._stack:
            self._close(self._stack[-1])
        entry = [name, 0, None]
        self._stack.append(entry)
        self._open(entry)
        try:
            yield
        except Exception as exc:
            if _is_oom(exc):
                self.oom = self.oom or name
            raise
        finally:
            self._close(entry)
            self._stack.pop()
            step = int(getattr(self._module, "rl_step", 0))
            self.peaks[name].append((step, entry[1]))
            if self._stack:
                self._open(self._stack[-1])

    def _wrap(self, obj, method: str, name: str, after=None) -> None:
        inner = getattr(obj, method)

        def wrapped(*args, **kwargs):
            with self.phase(name):
                out = inner(*args, **kwargs)
            if after is not None:
                after(out)
            return out

        setattr(obj, method, wrapped)

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        type(self).last = self  # for the script, which does not build the instance itself
        self._module, dm = pl_module, trainer.datamodule
        self._device = trainer.strategy.root_device
        self._wrap(pl_module, "_step_inputs", "logprob passes")
        self._wrap(pl_module, "_minibatch_step", "training")
        self._wrap(dm.pipeline, "sync", "weight sync")
        self._wrap(dm.pipeline, "run", "rollout", after=self._saw_batch)

    def _saw_batch(self, batch) -> None:
        if batch.prompt_ids:
            self.prompt_tokens = max(self.prompt_tokens, max(len(p) for p in batch.prompt_ids))
            self.first_prompt_ids = self.first_prompt_ids or list(batch.prompt_ids[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Between RL steps (after the previous step freed its gradients): what stays alive, the plan's states."""
        if pl_module.rl_step == 0:
            return  # AdamW's moments exist from the first optimizer step on
        if self._cuda():
            torch.cuda.synchronize(self._device)
            now = torch.cuda.memory_allocated(self._device)
        else:
            now = _live_tensor_bytes()
        self.peaks["states"].append((int(pl_module.rl_step), now))


# -------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/gpu/plan_1p7b", help="folder for plan_check.json and the run's logs")
    p.add_argument("--checkpoint", default=None, help="an SDAR-format checkpoint to use (default: write one)")
    p.add_argument("--checkpoint-dir", default="outputs/sdar_like",
                   help="where the random checkpoint is written (reused when present; not under --out: 3.4 GB)")
    p.add_argument("--config", default=str(ROOT / "configs" / "sdar_1p7b_1gpu.yaml"), help="the lrl fit config")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response length (default: the config's, 2048)")
    p.add_argument("--prompts-per-step", type=int, default=None, help="prompts per RL step (default: the config's)")
    p.add_argument("--group-size", type=int, default=None, help="samples per prompt (default: the config's)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="responses per micro-batch (default: config's)")
    p.add_argument("--rl-steps", type=int, default=2, help="RL steps to run")
    p.add_argument("--device-gb", type=float, default=None, help="device memory for the plan (default: the GPU's)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, tiny lengths, on CPU (checks the script)")
    return p.parse_args(argv)


def _checkpoint(args, out: Path) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    from lrl.models.sdar_like import build_sdar_like_checkpoint

    path = Path(args.checkpoint_dir) / ("tiny" if args.smoke else "sdar_1p7b")
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        build_sdar_like_checkpoint(path, **(SMOKE_SHAPE if args.smoke else SDAR_1P7B))
        _tie_embeddings(path)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return path


def _tie_embeddings(path: Path) -> None:
    """Make the checkpoint tie its LM head to the embedding as SDAR-1.7B (Qwen3-1.7B) does: 1.72 B parameters,
    not 2.03 B. Its files hold no ``lm_head.weight`` (transformers unties a head it finds in the files)."""
    from safetensors.torch import load_file, save_file

    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        if tensors.pop("lm_head.weight", None) is not None:
            save_file(tensors, f, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop("lm_head.weight", None)
        index.write_text(json.dumps(data, indent=2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _overrides(args, out: Path) -> list[str]:
    """The ``--key=value`` arguments of the run (the plan applies the same ones)."""
    o = [f"--model.init_args.max_rl_steps={args.rl_steps}",
         "--data.init_args.task=synthetic", "--data.init_args.task_kwargs={num_train: 64, num_eval: 4}",
         "--data.init_args.filter={all_wrong: false, tpf_range_threshold: null}",  # a random model is never right
         "--data.init_args.max_refill_rounds=1", "--model.init_args.warmup_steps=0"]
    for flag, key in (("max_new_tokens", "data.init_args.max_new_tokens"),
                      ("prompts_per_step", "data.init_args.prompts_per_step"),
                      ("group_size", "data.init_args.group_size"),
                      ("micro_batch_size", "model.init_args.micro_batch_size")):
        if getattr(args, flag) is not None:
            o.append(f"--{key}={getattr(args, flag)}")
    if args.smoke:
        o += ["--block_size=4", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
              "--data.init_args.rollout.kv_cache_gb=0.01", "--data.init_args.rollout.max_rows=8",
              "--data.init_args.rollout.transient_gb=0.01", "--model.init_args.micro_batch_size=2",
              "--model.init_args.eval.max_new_tokens=8", "--model.init_args.minibatches=2"]
    return o


def _smoke_defaults(args) -> None:
    if args.smoke:
        args.max_new_tokens = args.max_new_tokens or 8
        args.prompts_per_step = args.prompts_per_step or 2
        args.group_size = args.group_size or 2


def _fit(args, ckpt: Path, out: Path, overrides: list[str]) -> tuple[PhasePeaks | None, str | None]:
    from lrl.cli import cli_main

    argv = ["fit", "--config", str(args.config), f"--checkpoint={ckpt}", *overrides, "--skip_plan=true",
            f"--trainer.default_root_dir={out / 'fit'}", f"--trainer.logger.init_args.save_dir={out / 'fit'}",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks=[{class_path: gpu_plan_check.PhasePeaks}]"]  # no Pareto evaluation, no checkpoints
    cls = _imported_class()  # the class jsonargparse instantiates
    cls.last = None
    error = None
    try:
        cli_main(argv)
    except Exception as exc:  # noqa: BLE001 - the report is written whatever stopped the run (an OOM above all)
        traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0]
        error = f"{'out of memory' if _is_oom(exc) else type(exc).__name__}: {first}"
    return cls.last, error


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _imported_class():
    """`PhasePeaks` as jsonargparse imports it (``gpu_plan_check``, a second module when run as a script)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import gpu_plan_check

    return gpu_plan_check.PhasePeaks


def _plan(args, ckpt: Path, overrides: list[str], prompt_tokens: int, device_gb: float):
    import yaml

    from lrl.config_files import merged_config
    from lrl.plan import build_plan
    from lrl.plan.command import _set

    cfg = merged_config([str(args.config)])
    cfg["checkpoint"] = str(ckpt)
    cfg.setdefault("trainer", {})["callbacks"] = []
    for item in overrides:
        key, value = item[2:].split("=", 1)
        _set(cfg, key, yaml.safe_load(value))
    if prompt_tokens:  # the plan's prompt length: the longest the run saw (its default is a 1024-token bound)
        _set(cfg, "data.init_args.max_prompt_tokens", prompt_tokens)
    return build_plan(cfg, device_gb=device_gb)


def report(plan, cb: PhasePeaks | None, error: str | None) -> dict:
    states = plan.phase_bytes("states")
    rows = []
    for phase in PHASES:
        planned = states + (plan.phase_bytes(phase) if phase != "states" else 0)
        seen = cb.peaks[phase] if cb else []
        measured = max((b for _, b in seen), default=None)
        status = "oom" if cb and cb.oom == phase else ("not reached" if measured is None else "measured")
        ratio = measured / planned if measured and planned else None
        rows.append({"phase": phase, "planned_bytes": planned, "planned_phase_bytes": plan.phase_bytes(phase),
                     "measured_bytes": measured, "per_step": seen, "ratio": ratio, "status": status,
                     "within_15pct": ratio is not None and abs(ratio - 1) <= TOLERANCE})
    return {"phases": rows, "error": error, "plan_peak_bytes": plan.peak_bytes, "plan_peak_phase": plan.peak_phase,
            "shape": {"params": plan.shape.params, "layers": plan.shape.layers, "hidden": plan.shape.hidden,
                      "vocab": plan.shape.vocab}}


def format_report(rep: dict) -> str:
    lines = [f"{'phase':<16}{'planned GB':>12}{'measured GB':>13}{'ratio':>8}  within ±15 %"]
    for r in rep["phases"]:
        m = "-" if r["measured_bytes"] is None else f"{r['measured_bytes'] / GB:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        verdict = {"oom": "OUT OF MEMORY", "not reached": "not reached"}.get(r["status"],
                                                                             "yes" if r["within_15pct"] else "NO")
        lines.append(f"{r['phase']:<16}{r['planned_bytes'] / GB:>12.2f}{m:>13}{ratio:>8}  {verdict}")
    if rep["error"]:
        lines.append(f"run stopped: {rep['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)  # the CPU check runs beside other work
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_plan_check: no CUDA device (use --smoke for the CPU check)")
    _smoke_defaults(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(args, out)
    overrides = _overrides(args, out)
    t0 = time.perf_counter()
    cb, error = _fit(args, ckpt, out, overrides)
    fit_s = time.perf_counter() - t0
    device_gb = args.device_gb or (torch.cuda.get_device_properties(0).total_memory / GB if not args.smoke else 80.0)
    plan = _plan(args, ckpt, overrides, cb.prompt_tokens if cb else 0, device_gb)
    rep = report(plan, cb, error)
    rep.update(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "cpu",
               measurer="torch.cuda.max_memory_allocated" if not args.smoke else "live tensors + LiveTensorBytes",
               fit_seconds=round(fit_s, 1), overrides=overrides, config=str(args.config), checkpoint=str(ckpt),
               prompt_tokens=cb.prompt_tokens if cb else None,
               first_prompt_ids=(cb.first_prompt_ids if cb else [])[:8])
    from lrl.atomic import atomic_write

    atomic_write(out / "plan_check.json", json.dumps(rep, indent=2))
    print(format_report(rep))
    return rep


if __name__ == "__main__":
    main()
