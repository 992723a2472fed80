"""`make demo`: LightningRL end to end on a tiny block-diffusion model, on a CPU, in minutes.

1. the base model: a tiny block-16 block-diffusion LM SFT'd on the `sums` task (four amounts added up, answered
   as a running total, `chain`, or as two partial sums and their total, `pairs`, which has one dependent step fewer
   and decodes in fewer forwards), committed in outputs/base/styles_pairs_b16 (rebuilt in two SFT stages from the
   committed multi-style base with --rebuild-base);
2. the "before" frontier: accuracy, TPF, forwards per response and answer styles of the base over a threshold sweep
   on held-out problems;
3. LightningRL: `lrl fit --config configs/quickstart.yaml` (paper profile);
4. the "after" frontier of the trained policy, a before/after table with style shares, a Pareto plot and the
   TensorBoard command.

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
RUN = ROOT / "outputs" / "quickstart"
QUICKSTART = "configs/quickstart.yaml"
# how the base is rebuilt: the committed multi-style block-16 base continued on the `sums` task (50/50), then on
# 70 % `pairs` (each stage writes the checkpoint the next one starts from)
BASE_STAGES = (("configs/sft_tiny.yaml", "configs/sft/styles_sums.yaml"),
               ("configs/sft_tiny.yaml", "configs/sft/styles_sums_pairs.yaml"))


def quiet() -> None:
    """Drop the start-up noise a newcomer cannot act on (a torch deprecation inside Lightning, the logger tip)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


def banner(text: str) -> None:
    print(f"\n\033[1m== {text} ==\033[0m", flush=True)


def build_base(base: Path, rebuild: bool) -> float:
    if (base / "config.json").exists() and not rebuild:
        print(f"base checkpoint found: {base} (pass --rebuild-base to retrain it)")
        return 0.0
    from lrl.cli import cli_main

    start = time.perf_counter()
    for k, configs in enumerate(BASE_STAGES, 1):
        banner(f"1/4 SFT of the tiny base model, stage {k}/{len(BASE_STAGES)} ({' + '.join(configs)})")
        cli_main(["fit", *(a for c in configs for a in ("--config", c))])
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
    quiet()
    t0 = time.perf_counter()
    cfg = yaml.safe_load(Path(QUICKSTART).read_text())
    base = ROOT / cfg["checkpoint"]
    sft_s = build_base(base, args.rebuild_base)

    from lrl.evaluation.pareto import ParetoResult, format_table, write_pareto
    from lrl.metrics import aup, pareto_frontier
    from lrl.models import load_checkpoint
    from lrl.tasks import get_task

    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    block_size, max_new = cfg["block_size"], model["eval"]["max_new_tokens"]
    thresholds = list(model["eval"]["thresholds"])
    task = get_task(data["task"], **{**data.get("task_kwargs", {}), "eval_seed": data.get("eval_seed", 1)})
    records = task.load(data.get("eval_split", "test"))[: args.eval_size]

    banner("2/4 the base model's accuracy–TPF frontier (held-out problems, greedy)")
    base_lm, tok = load_checkpoint(base, block_size=block_size)
    before = sweep(base_lm, tok, task, records, thresholds, block_size, max_new)
    print(format_table(before))

    banner("3/4 LightningRL on the base (configs/quickstart.yaml); watch: tensorboard --logdir outputs/quickstart")
    shutil.rmtree(RUN, ignore_errors=True)  # the demo always starts a fresh run
    from lrl.cli import cli_main

    fit_args = ["fit", "--config", QUICKSTART]
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


def _aup_all(result) -> float:
    """AUP with every point kept: d3LLM's rule drops points > 5 accuracy points below the 1-token point, which can
    reduce a whole curve to that point."""
    from lrl.metrics import aup

    curve = [(p.tpf, p.accuracy) for p in result.points]
    return aup(curve, y_max=result.y_max, y_min_offset=float("inf")) if result.y_max > 0 else 0.0


def before_after_table(before, after, select: float) -> str:
    def row(name, b, a, fmt="{:.1f}"):
        change = f"{a / b:.2f}×" if b else "–"
        return f"| {name} | {fmt.format(b)} | {fmt.format(a)} | {change} |"

    b_sel, a_sel = before.point(select), after.point(select)
    lines = ["| metric (held-out, greedy) | SFT base | LightningRL | ratio |", "|---|---|---|---|",
             row(f"accuracy % @ φ={select:g}", b_sel.accuracy, a_sel.accuracy),
             *([row(f"right answers over sound steps % @ φ={select:g}", b_sel.sound_accuracy,
                    a_sel.sound_accuracy)] if b_sel.sound_accuracy is not None and a_sel.sound_accuracy is not None
               else []),
             row(f"TPF @ φ={select:g}", b_sel.tpf, a_sel.tpf, "{:.2f}"),
             row(f"forwards per response @ φ={select:g}", b_sel.forwards_per_response, a_sel.forwards_per_response,
                 "{:.2f}"),
             row(f"tokens per response @ φ={select:g}", b_sel.tokens_per_response, a_sel.tokens_per_response),
             row("AUP over the sweep", before.aup, after.aup),
             row("AUP, all points (no 5-point drop rule)", _aup_all(before), _aup_all(after))]
    for style in dict.fromkeys([*b_sel.styles, *a_sel.styles]):
        b_st, a_st = b_sel.styles.get(style, {}), a_sel.styles.get(style, {})
        if not (b_st.get("share") or a_st.get("share")):
            continue
        lines.append(f"| style `{style}` @ φ={select:g}: share / acc % / forwards | "
                     + " | ".join(f"{st.get('share', 0):.0%} / {st.get('accuracy', 0):.1f} / "
                                  f"{st.get('forwards_per_response', 0):.2f}" for st in (b_st, a_st)) + " | |")
    for pb, pa in zip(before.points, after.points):
        if pb.threshold == select:
            continue
        lines.append(f"| {pb.setting}: acc % / TPF | {pb.accuracy:.1f} / {pb.tpf:.2f} | "
                     f"{pa.accuracy:.1f} / {pa.tpf:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
