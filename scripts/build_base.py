"""Build the demo's base model (SFT from scratch, configs/sft_tiny.yaml) and measure its accuracy/TPF trade-off.

Usage::

    python scripts/build_base.py                      # train (lrl fit --config configs/sft_tiny.yaml), then evaluate
    python scripts/build_base.py --skip-train         # evaluate an existing export only
    python scripts/build_base.py -- --trainer.max_steps=100   # arguments after -- go to `lrl fit`
    python scripts/build_base.py --config configs/sft_tiny.yaml --config configs/sft/block16.yaml  # block 16

Evaluation: greedy decoding with the native engine on the held-out split of the DEFAULT synthetic task (the set the
RL demo evaluates on), with the static anchor (one token per forward) and ``low_confidence_dynamic`` at several
thresholds. Prints a table and, as its last line, one JSON object with the figures (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lrl.models import load_checkpoint
from lrl.rollout import NativeEngine, SamplingParams
from lrl.sft import score_completions
from lrl.tasks import get_task


def evaluate(checkpoint: str, *, thresholds: list[float], num_eval: int, max_new_tokens: int, split: str = "test",
             block_size: int | None = None, task_kwargs: dict | None = None, samples: int = 0) -> list[dict]:
    """Accuracy, TPF (Σ tokens ÷ Σ forwards), forwards per response and per-style figures of greedy decodes per
    unmasking setting; with ``samples`` > 0 also of that many temperature-1 samples per prompt at each threshold
    (what RL sees)."""
    from lrl.evaluation.pareto import sound_accuracy, style_breakdown

    lm, tok = load_checkpoint(checkpoint, block_size=block_size)
    lm.eval()
    task = get_task("synthetic", **(task_kwargs or {}))
    records = task.load(split)[:num_eval]
    prompts = [task.prompt(r) for r in records]
    engine = NativeEngine(lm, tok)
    settings = [("static", 1.0, True)] + [("dynamic", t, True) for t in thresholds]
    settings += [("sampled", t, False) for t in thresholds] if samples > 0 else []
    rows = []
    for strategy, threshold, greedy in settings:
        sp = SamplingParams(
            block_size=lm.bd.block_size, greedy=greedy, max_new_tokens=max_new_tokens,
            stop_token_ids=(tok.eos_token_id,), threshold=threshold, denoising_steps=lm.bd.block_size,
            remasking_strategy="low_confidence_static" if strategy == "static" else "low_confidence_dynamic",
            samples_per_prompt=1 if greedy else samples, temperature=1.0, seed=0,
        )
        start = time.perf_counter()
        out = engine.generate(prompts, sp)
        secs = time.perf_counter() - start
        per_row = [records[int(g)] for g in out.group_index]
        scores = score_completions(task, out.texts, per_row)
        rows.append({
            "strategy": strategy, "threshold": threshold, "accuracy": sum(scores) / len(scores),
            "tpf": out.batch_tpf, "mean_tokens": float(out.response_lengths.float().mean()),
            "forwards_per_response": float(out.num_forwards.float().mean()),
            "stopped": float((~out.truncated).float().mean()), "seconds": secs,
            "styles": style_breakdown(task, out, scores), "example": out.texts[0],
            "sound_accuracy": sound_accuracy(task, out.texts, scores),
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=None,
                   help="SFT config(s) for `lrl fit`, merged in order (default: configs/sft_tiny.yaml)")
    p.add_argument("--checkpoint", default=None,
                   help="export to evaluate (default: the config's model export_dir, else its `checkpoint`)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate the existing export")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    p.add_argument("--num-eval", type=int, default=200, help="held-out problems (default: the whole eval split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="also write the JSON summary here")
    p.add_argument("--samples", type=int, default=0,
                   help="also evaluate this many temperature-1 samples per prompt at each threshold")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # 2 threads on a shared 2-core box was far slower (README)
    torch.manual_seed(0)

    configs = args.config or ["configs/sft_tiny.yaml"]
    checkpoint = args.checkpoint
    if checkpoint is None:
        from lrl.config_files import merged_config

        cfg = merged_config(configs)
        overrides = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in fit_args if "=" in a}
        export_dir = overrides.get("--model.init_args.export_dir",
                                   cfg.get("model", {}).get("init_args", {}).get("export_dir"))
        if export_dir in ("null", "None", ""):  # a command-line null
            export_dir = None
        # without an export_dir the SFT exports to `checkpoint` (as `lrl fit` does)
        checkpoint = export_dir or overrides.get("--checkpoint", cfg["checkpoint"])
    task_kwargs = {}
    if configs:
        from lrl.config_files import merged_config

        # the task as the config trains it (styles, problem family), with the default sizes: the RL demo's held-out set
        kw = merged_config(configs).get("data", {}).get("init_args", {}).get("task_kwargs") or {}
        task_kwargs = {k: v for k, v in kw.items() if k in ("styles", "family")}
    summary: dict = {"checkpoint": checkpoint, "task_kwargs": task_kwargs}
    if not args.skip_train:
        from lrl.cli import cli_main

        start = time.perf_counter()
        cli_main(["fit", *(a for c in configs for a in ("--config", c)), *fit_args])
        summary["train_seconds"] = round(time.perf_counter() - start, 1)
        print(f"SFT wall time: {summary['train_seconds']:.1f} s")

    rows = evaluate(checkpoint, thresholds=args.thresholds, num_eval=args.num_eval,
                    max_new_tokens=args.max_new_tokens, task_kwargs=task_kwargs, samples=args.samples)
    summary["eval"] = rows
    print(f"\n{'setting':<16}{'accuracy':>10}{'TPF':>8}{'tokens':>8}{'fwd/resp':>9}{'stopped':>9}{'secs':>7}  example")
    for r in rows:
        name = "static k=1" if r["strategy"] == "static" else f"{r['strategy']} {r['threshold']:.2f}"
        print(f"{name:<16}{r['accuracy']:>10.3f}{r['tpf']:>8.2f}{r['mean_tokens']:>8.1f}"
              f"{r['forwards_per_response']:>9.2f}{r['stopped']:>9.2f}{r['seconds']:>7.1f}  {r['example']!r}")
        for style, st in r["styles"].items():
            if st["share"] > 0:
                sound = f", sound steps {st['sound_accuracy']:.1f} %" if "sound_accuracy" in st else ""
                print(f"  {style:<14}{st['accuracy'] / 100:>10.3f}{st['tpf']:>8.2f}{st['tokens_per_response']:>8.1f}"
                      f"{st['forwards_per_response']:>9.2f}  share {st['share']:.0%}{sound}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
