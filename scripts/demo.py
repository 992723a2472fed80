"""`make demo`: LightningRL end to end on a tiny block-diffusion model, on a CPU, in minutes.

1. the base model: `configs/sft_tiny.yaml` (block-diffusion SFT on the synthetic arithmetic task), built once and
   cached in outputs/base/sft_tiny;
2. the "before" frontier: accuracy and TPF of the base over a threshold sweep on held-out problems;
3. LightningRL: `lrl fit --config configs/quickstart.yaml` (paper profile);
4. the "after" frontier of the trained policy, a before/after table, a Pareto plot and the TensorBoard command.

Usage: python scripts/demo.py [--rl-steps N] [--eval-size N] [--rebuild-base]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BASE = ROOT / "outputs" / "base" / "sft_tiny"
RUN = ROOT / "outputs" / "quickstart"


def banner(text: str) -> None:
    print(f"\n\033[1m== {text} ==\033[0m", flush=True)


def build_base(rebuild: bool) -> float:
    if (BASE / "config.json").exists() and not rebuild:
        print(f"base checkpoint found: {BASE} (delete it or pass --rebuild-base to retrain)")
        return 0.0
    from lrl.cli import cli_main

    banner("1/4 block-diffusion SFT of the tiny base model (configs/sft_tiny.yaml)")
    start = time.perf_counter()
    cli_main(["fit", "--config", "configs/sft_tiny.yaml"])
    return time.perf_counter() - start


def sweep(lm, tok, task, records, thresholds, block_size, max_new, y_max=None):
    from lrl.evaluation import run_pareto_sweep
    from lrl.rollout import NativeEngine

    lm.eval()
    engine = NativeEngine(lm, tok, progress=False)
    return run_pareto_sweep(engine, task, records, thresholds=thresholds, block_size=block_size,
                            max_new_tokens=max_new, stop_token_ids=(tok.eos_token_id,), y_max=y_max)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: configs/quickstart.yaml)")
    ap.add_argument("--eval-size", type=int, default=200, help="held-out problems in the before/after sweeps")
    ap.add_argument("--rebuild-base", action="store_true", help="retrain the SFT base even if cached")
    args = ap.parse_args(argv)

    import torch
    import yaml

    # one thread: a tiny model gains nothing from more, and OpenMP threads that spin against another busy process
    # slowed these runs by 50x on a 2-core machine
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    sft_s = build_base(args.rebuild_base)

    from lrl.evaluation.pareto import ParetoResult, format_table, write_pareto
    from lrl.metrics import aup, pareto_frontier
    from lrl.models import load_checkpoint
    from lrl.tasks import get_task

    cfg = yaml.safe_load(Path("configs/quickstart.yaml").read_text())
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    block_size, max_new = cfg["block_size"], model["eval_max_new_tokens"]
    thresholds = list(model["eval_thresholds"])
    task = get_task(data["task"], **{**data.get("task_kwargs", {}), "eval_seed": data.get("eval_seed", 1)})
    records = task.load(data.get("eval_split", "test"))[: args.eval_size]

    banner("2/4 the base model's accuracy–TPF frontier (held-out problems, greedy)")
    base_lm, tok = load_checkpoint(BASE)
    before = sweep(base_lm, tok, task, records, thresholds, block_size, max_new)
    print(format_table(before))

    banner("3/4 LightningRL on the base (configs/quickstart.yaml); watch: tensorboard --logdir outputs/quickstart")
    shutil.rmtree(RUN, ignore_errors=True)  # the demo always starts a fresh run
    from lrl.cli import cli_main

    fit_args = ["fit", "--config", "configs/quickstart.yaml"]
    if args.rl_steps is not None:
        fit_args.append(f"--model.init_args.max_rl_steps={args.rl_steps}")
    t_rl = time.perf_counter()
    cli = cli_main(fit_args)
    rl_s = time.perf_counter() - t_rl

    banner("4/4 the trained policy's frontier")
    after = sweep(cli.model.policy, tok, task, records, thresholds, block_size, max_new)
    print(format_table(after))

    # one y_max for both curves (d3LLM: the best accuracy over all methods), so the AUPs are comparable
    y_max = max(p.accuracy for p in before.points + after.points)
    for res in (before, after):
        res.y_max = y_max
        res.aup = aup([(p.tpf, p.accuracy) for p in res.points], y_max=y_max) if y_max > 0 else 0.0
        res.frontier = pareto_frontier([(p.tpf, p.accuracy) for p in res.points])
    write_pareto(after, RUN / "demo", title="LightningRL vs SFT base (held-out)", baseline=before,
                 extra={"base": before.to_dict()})
    table = before_after_table(before, after, select=float(data.get("threshold", 0.9)))
    (RUN / "demo" / "before_after.md").write_text(table + "\n")
    banner("before / after")
    print(table)
    total = time.perf_counter() - t0
    print(f"\ntimes: SFT {sft_s:.0f} s (0 = cached), RL {rl_s:.0f} s, demo total {total:.0f} s")
    print(f"Pareto plot: {RUN / 'demo' / 'pareto.png'}   numbers: {RUN / 'demo' / 'pareto.json'}")
    print("TensorBoard: .venv/bin/tensorboard --logdir outputs/quickstart")
    json.dump({"sft_s": sft_s, "rl_s": rl_s, "total_s": total, "aup_before": before.aup, "aup_after": after.aup},
              open(RUN / "demo" / "timings.json", "w"))
    assert isinstance(after, ParetoResult)
    return 0


def before_after_table(before, after, select: float) -> str:
    def row(name, b, a, fmt="{:.1f}"):
        change = f"{a / b:.2f}×" if b else "–"
        return f"| {name} | {fmt.format(b)} | {fmt.format(a)} | {change} |"

    b_sel, a_sel = before.point(select), after.point(select)
    lines = ["| metric (held-out, greedy) | SFT base | LightningRL | ratio |", "|---|---|---|---|",
             row(f"accuracy % @ φ={select:g}", b_sel.accuracy, a_sel.accuracy),
             row(f"TPF @ φ={select:g}", b_sel.tpf, a_sel.tpf, "{:.2f}"),
             row("AUP over the sweep", before.aup, after.aup)]
    for pb, pa in zip(before.points, after.points):
        if pb.threshold == select:
            continue
        lines.append(f"| {pb.setting}: acc % / TPF | {pb.accuracy:.1f} / {pb.tpf:.2f} | "
                     f"{pa.accuracy:.1f} / {pa.tpf:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
