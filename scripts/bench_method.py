"""Method benchmark on the synthetic task: SFT base vs GRPO(traj) vs LightningRL (and ablations, and dUltra's
planner methods), several seeds.

Every method starts from the same SFT base, trains with the same budget (configs/quickstart.yaml: prompts per
step, group size, steps, decoding settings) and is evaluated on the same held-out problems with the same
greedy threshold sweep. AUP uses one y_max for all methods (d3LLM: the best accuracy of any method and point).

dUltra methods (`PLANNER_METHODS`, spec §8.3) train with configs/dultra.yaml layered on the benchmark's configs,
from a checkpoint whose planner head was first fitted by imitation of the threshold rule at φ
(scripts/dultra_imitation.py; cached under <out>/planner_init, or --planner-init DIR), and are evaluated on the
planner's own greedy sweep (the 1-token anchor and p ≥ t for ``eval.planner_thresholds``); their table row is
read at p ≥ 0.5 (the planner strategy's default). "LightningRL → planner" trains LightningRL first (reusing the
same seed's LightningRL run when it is in the same invocation), fits a head on its export by imitation, then
trains the head alone.

Writes outputs/bench/method.json, outputs/bench/method.md and outputs/bench/method.png.

    python scripts/bench_method.py --seeds 0 1 2 [--ablations] [--rl-steps 30] [--eval-size 200]
    python scripts/bench_method.py --merge outputs/bench/s0 outputs/bench/s1 outputs/bench/s2   # seeds run apart
    python scripts/bench_method.py --config configs/quickstart.yaml --config configs/model/tiny_b16.yaml  # block 16
    python scripts/bench_method.py --methods LightningRL dUltra "dUltra, planner-only" "LightningRL → planner"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the paper's reward without its TPF term (logged at weight 0), as `data.init_args.rewards` (docs/rewards.md)
NO_TPF_REWARD = ("--data.init_args.rewards=[{class_path: lrl.rewards.terms.Accuracy, init_args: {normalize: pm1}}, "
                 "{class_path: lrl.rewards.terms.TPF, init_args: {weight: 0.0, normalize: none}}]")

# method name → extra `lrl fit` arguments on top of configs/quickstart.yaml
METHODS: dict[str, list[str]] = {
    "GRPO(traj)": [
        "--model.init_args.loss.nll_weight=0.0", NO_TPF_REWARD, "--data.init_args.advantage=prompt_group",
        "--data.init_args.filter={all_wrong: true, tpf_range_threshold: null}",
    ],
    "LightningRL": [],
}
ABLATIONS: dict[str, list[str]] = {
    "LightningRL, no TPF reward": [NO_TPF_REWARD],
    "LightningRL, single-pass": ["--model.init_args.estimator=single_pass"],
    "LightningRL, masked-states": ["--model.init_args.estimator=masked_states"],
    # does the TPF reward act once the estimator scores the states where parallelism is decided?
    "LightningRL, masked-states, no TPF reward": [
        "--model.init_args.estimator=masked_states", NO_TPF_REWARD,
    ],
    "LightningRL, no NLL": ["--model.init_args.loss.nll_weight=0.0"],
    # the TPF reward's own effect without the NLL term's sharpening (compare with "LightningRL, no NLL")
    "LightningRL, no NLL, no TPF reward": ["--model.init_args.loss.nll_weight=0.0", NO_TPF_REWARD],
    "LightningRL, joint norm.": ["--data.init_args.joint_normalization=z_score"],
    "LightningRL, no TPF filter": ["--data.init_args.filter={all_wrong: true, tpf_range_threshold: null}"],
}

# dUltra (spec §8.3): name → (method trained first, or None for the SFT base; extra `lrl fit` arguments on top of
# the benchmark's configs + PLANNER_CONFIG). Each starts from an imitation-fitted planner head.
PLANNER_CONFIG = "configs/dultra.yaml"
PLANNER_METHODS: dict[str, tuple[str | None, list[str]]] = {
    "dUltra": (None, []),
    "dUltra, planner-only": (None, ["--model.init_args.freeze_backbone=true"]),
    "LightningRL → planner": ("LightningRL", ["--model.init_args.freeze_backbone=true"]),
}
PLANNER_SELECT = 0.5  # the planner methods' table row: greedy p ≥ 0.5 (SamplingParams.planner_threshold default)
PLANNER_BASE = "SFT base + planner (imitation)"  # the imitation-fitted head on the SFT base, before any RL
# the keys PLANNER_CONFIG adds to the benchmark's configs (the rest of the budget stays the benchmark's own)
PLANNER_KEYS = {"model": ("planner_head", "planner_lr", "freeze_backbone", "planner_ratio",
                          "eval.planner_thresholds"),
                "data": ("remasking_strategy", "rewards")}


def planner_args(config: dict) -> list[str]:
    """`lrl fit` arguments setting `PLANNER_KEYS` to their values in ``config`` (a merged config dict)."""
    out = []
    for section, keys in PLANNER_KEYS.items():
        for k in keys:  # a dotted key sets one field of a group (`eval.planner_thresholds`), not the whole group
            node = config[section]["init_args"]
            for part in k.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING:
                out.append(f"--{section}.init_args.{k}={node if isinstance(node, str) else json.dumps(node)}")
    return out


_MISSING = object()


def train(method_args: list[str], seed: int, steps: int | None, out: Path, configs: list[str]):
    from lrl.cli import cli_main

    # the paper's filter (the methods may turn its TPF rule off) and no checkpoint/evaluation callbacks
    args = ["fit", *(a for c in configs for a in ("--config", c)),
            f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.logger.init_args.name=run", "--trainer.enable_progress_bar=false",
            "--data.init_args.filter={all_wrong: true, tpf_range_threshold: 0.01}", "--trainer.callbacks=[]",
            *method_args]
    if steps is not None:
        args.append(f"--model.init_args.max_rl_steps={steps}")
    return cli_main(args).model.policy


def evaluate(lm, tok, task, records, thresholds, block_size, max_new, planner_thresholds=()):
    """Greedy sweep of ``lm``: the threshold rule at ``thresholds``, or (planner methods: ``thresholds`` empty)
    the planner at ``planner_thresholds``; the 1-token anchor either way."""
    from lrl.evaluation import run_pareto_sweep
    from lrl.rollout import NativeEngine

    lm.eval()
    res = run_pareto_sweep(NativeEngine(lm, tok), task, records, thresholds=thresholds, block_size=block_size,
                           max_new_tokens=max_new, stop_token_ids=(tok.eos_token_id,),
                           planner_thresholds=list(planner_thresholds))
    return [{"setting": p.setting, "threshold": p.threshold, "accuracy": p.accuracy, "tpf": p.tpf,
             "forwards_per_response": p.forwards_per_response, "tokens_per_response": p.tokens_per_response,
             "styles": {k: v["share"] for k, v in p.styles.items()}, "sound_accuracy": p.sound_accuracy}
            for p in res.points]


def run_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per-RL-step scalars of a finished run from its TensorBoard events: style shares, forwards per response and
    the phase timings (``timing/*``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[float]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(("style/", "timing/", "rollout/forwards", "rollout/tokens", "rollout/distinct",
                               "rollout/tpf_std", "rollout/tpf_var")):
                curves[tag] = [e.value for e in acc.Scalars(tag)]
    return curves


def planner_init(checkpoint: Path, out: Path, *, threshold: float, block: int, max_new: int, eval_size: int,
                 prompts: int, steps: int) -> Path:
    """``out``: ``checkpoint`` with a planner head fitted by imitation of the threshold rule at φ = ``threshold``
    (scripts/dultra_imitation.py), reused when ``out`` already holds a checkpoint with a head."""
    cfg = out / "config.json"
    if cfg.exists() and "planner_head" in json.loads(cfg.read_text()):
        print(f"[planner init] reusing {out}", flush=True)
        return out
    from dultra_imitation import main as imitate

    imitate(["--checkpoint", str(checkpoint), "--out", str(out), "--threshold", str(threshold),
             "--block-size", str(block), "--max-new-tokens", str(max_new), "--eval-prompts", str(eval_size),
             "--train-prompts", str(prompts), "--steps", str(steps)])
    return out


def selected_point(pts: list[dict], select: float) -> dict:
    """The table's point of one run: the threshold rule at φ = ``select`` or, for a planner sweep, p ≥ 0.5."""
    for setting in (f"dynamic@{select:g}", f"planner@{PLANNER_SELECT:g}"):
        hit = next((p for p in pts if p["setting"] == setting), None)
        if hit is not None:
            return hit
    return next(p for p in pts if p["threshold"] == select)  # results written before the settings were named


def summarize(results: dict[str, list[list[dict]]], select: float) -> dict[str, dict]:
    """Per method: mean/std over seeds of accuracy and TPF at `select` (planner sweeps: p ≥ 0.5), and of AUP with
    one global y_max."""
    from lrl.metrics import aup

    y_max = max(p["accuracy"] for runs in results.values() for pts in runs for p in pts)
    out = {}
    for name, runs in results.items():
        accs, sound, tpfs, aups, full, fwd, toks, styles = [], [], [], [], [], [], [], []
        for pts in runs:
            sel = selected_point(pts, select)
            accs.append(sel["accuracy"])
            sound.append(float("nan") if sel.get("sound_accuracy") is None else sel["sound_accuracy"])
            tpfs.append(sel["tpf"])
            fwd.append(sel.get("forwards_per_response", float("nan")))
            toks.append(sel.get("tokens_per_response", float("nan")))
            styles.append(sel.get("styles", {}))
            curve = [(p["tpf"], p["accuracy"]) for p in pts]
            aups.append(aup(curve, y_max=y_max) if y_max > 0 else 0.0)
            # d3LLM drops points > 5 accuracy points below the curve's first (1-token) point; without that rule
            # a run whose φ = 0.9 point sits just past the line is not reduced to its TPF-1 point
            full.append(aup(curve, y_max=y_max, y_min_offset=float("inf")) if y_max > 0 else 0.0)
        out[name] = {"acc": accs, "sound_acc": sound, "tpf": tpfs, "aup": aups, "aup_all_points": full,
                     "forwards": fwd, "tokens": toks,
                     "y_max": y_max,
                     "styles": {k: statistics.fmean(s.get(k, 0.0) for s in styles)
                                for k in dict.fromkeys(k for st in styles for k in st)}}
    return out


def _ms(values: list[float], fmt: str) -> str:
    if any(v != v for v in values):  # NaN: not measured (results written before the column existed)
        return "–"
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(sd)}"


def method_table(summary: dict[str, dict], select: float, base: str = "SFT base") -> str:
    """Markdown: one row per method with mean ± std over seeds and the ratios to the base's means."""
    b = summary[base]
    b_tpf, b_aup, b_acc = statistics.fmean(b["tpf"]), statistics.fmean(b["aup"]), statistics.fmean(b["acc"])
    b_fwd = statistics.fmean(b.get("forwards", [float("nan")]))
    lines = [f"| method | acc % @ φ={select:g} | TPF @ φ={select:g} | AUP | AUP, all points | forwards/resp. | "
             "tokens/resp. | styles | sound steps % | Δacc vs base | TPF × base | forwards × base | AUP × base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        acc, tpf, aupv = (statistics.fmean(s[k]) for k in ("acc", "tpf", "aup"))
        fwd = s.get("forwards", [float("nan")])
        styles = " ".join(f"{k} {v:.0%}" for k, v in s.get("styles", {}).items() if v > 0) or "-"
        lines.append(
            f"| {name} | {_ms(s['acc'], '{:.1f}')} | {_ms(s['tpf'], '{:.2f}')} | {_ms(s['aup'], '{:.1f}')} | "
            f"{_ms(s.get('aup_all_points', [float('nan')]), '{:.1f}')} | {_ms(fwd, '{:.2f}')} | "
            f"{statistics.fmean(s.get('tokens', [float('nan')])):.1f} | {styles} | "
            f"{_ms(s.get('sound_acc', [float('nan')]), '{:.1f}')} | "
            f"{acc - b_acc:+.1f} | {tpf / b_tpf if b_tpf else float('nan'):.2f} | "
            f"{statistics.fmean(fwd) / b_fwd if b_fwd else float('nan'):.2f} | "
            f"{aupv / b_aup if b_aup else float('nan'):.2f} |"
        )
    n = len(next(iter(summary.values()))["acc"])
    lines.append(f"\nmean ± std over {n} seed(s); AUP with y_max = {b['y_max']:.1f} for every method.")
    if any(name in PLANNER_METHODS for name in summary):
        lines.append(f"dUltra rows: the planner's own greedy sweep, read at p ≥ {PLANNER_SELECT:g} instead of φ.")
    return "\n".join(lines)


def merge_runs(runs: list[dict]) -> dict:
    """One ``method.json`` payload from several (e.g. one per seed, run side by side); seeds must not repeat
    across runs, except for runs of other methods with the same seeds (ablations run later), which are joined first.

    Each method's per-seed point lists are concatenated in the order of ``runs``; the select threshold and the
    configs must agree.
    """
    if not runs:
        raise ValueError("nothing to merge")
    runs = _join_methods(runs)
    for key in ("select_threshold", "configs", "fit_args"):
        values = {json.dumps(r.get(key)) for r in runs}
        if len(values) > 1:
            raise ValueError(f"runs disagree on {key}: {sorted(values)}")
    seeds = [s for r in runs for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears in more than one run: {seeds}")
    results: dict[str, list] = {}
    timings: dict[str, list] = {}
    curves: dict[str, list] = {}
    for r in runs:
        for name, per_seed in r.get("curves", {}).items():
            curves.setdefault(name, []).extend(per_seed)
        for name, per_seed in r["results"].items():
            if len(per_seed) != len(r["seeds"]):
                raise ValueError(f"{name}: {len(per_seed)} results for seeds {r['seeds']}")
            results.setdefault(name, []).extend(per_seed)
        for name, secs in r.get("timings_s", {}).items():
            timings.setdefault(name, []).extend(secs)
    missing = {name: len(v) for name, v in results.items() if len(v) != len(seeds)}
    if missing:
        raise ValueError(f"methods not run for every seed ({len(seeds)}): {missing}")
    return {"results": results, "timings_s": timings, "curves": curves, "seeds": seeds,
            "select_threshold": runs[0]["select_threshold"], "configs": runs[0].get("configs"),
            "fit_args": runs[0].get("fit_args")}


def _join_methods(runs: list[dict]) -> list[dict]:
    """Runs with the same seeds but other methods (e.g. ablations run later) become one run per seed list; their
    "SFT base" results must agree (the base is deterministic) and no other method may appear twice."""
    joined: dict[str, dict] = {}
    for r in runs:
        key = json.dumps(r["seeds"])
        if key not in joined:
            joined[key] = {**r, "results": dict(r["results"]), "timings_s": dict(r.get("timings_s", {})),
                           "curves": dict(r.get("curves", {}))}
            continue
        into = joined[key]
        for name, per_seed in r["results"].items():
            if name in ("SFT base", PLANNER_BASE) and name in into["results"]:
                if json.dumps(per_seed) != json.dumps(into["results"][name]):
                    raise ValueError(f"runs with seeds {r['seeds']} disagree on the {name}'s results")
                continue
            if name in into["results"]:
                raise ValueError(f"{name} appears twice for seeds {r['seeds']}")
            into["results"][name] = per_seed
            for field in ("timings_s", "curves"):
                if name in r.get(field, {}):
                    into[field][name] = r[field][name]
    return list(joined.values())


def write_outputs(payload: dict, out: Path) -> str:
    """method.json (with the summary), method.md and method.png under ``out``; returns the Markdown table."""
    from lrl.atomic import atomic_write

    select = payload["select_threshold"]
    summary = summarize(payload["results"], select)
    table = method_table(summary, select)
    if payload.get("curves"):
        table += "\n\n" + phase_table(payload["curves"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "method.json", json.dumps({**payload, "summary": summary}, indent=2).encode())
    (out / "method.md").write_text(table + "\n")
    plot(payload["results"], out / "method.png")
    if payload.get("curves"):
        plot_styles(payload["curves"], out / "styles.png")
    return table


def _or_dash(value: float) -> str:
    """A table cell: ``-`` for a figure the run did not log (runs from before the diagnostic existed)."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def tail_mean(values: list[float]) -> float:
    """Mean of the last eighth of a per-RL-step curve (at least its last value)."""
    return statistics.fmean(values[-max(1, len(values) // 8):])


def phase_table(curves: dict[str, list[dict]]) -> str:
    """Markdown: mean seconds per RL step of each phase (rollout, reward, training), the rollout diagnostics at the
    first RL step and over the last eighth of the steps (`tail_mean`: one step's value moves by ±1 forward between
    steps), and the share of the within-group TPF variance of correct answers that lies between
    different texts (mean over the run; `lrl.metrics.diagnostics`), per method (means over seeds)."""
    lines = ["| method | rollout s/step | reward s/step | train s/step | forwards/resp. (first step → last ⅛) | "
             "distinct texts/group (first → last ⅛) | TPF variance between texts, correct answers |",
             "|---|---|---|---|---|---|---|"]

    def mean_of(runs, key, pick):
        vals = [pick(r[key]) for r in runs if r.get(key)]
        return statistics.fmean(vals) if vals else float("nan")

    for name, runs in curves.items():
        avg = lambda v: statistics.fmean(v)  # noqa: E731
        lines.append(
            f"| {name} | {mean_of(runs, 'timing/rollout_s', avg):.2f} | {mean_of(runs, 'timing/reward_s', avg):.2f} | "
            f"{mean_of(runs, 'timing/train_s', avg):.2f} | "
            f"{mean_of(runs, 'rollout/forwards_per_response', lambda v: v[0]):.2f} → "
            f"{mean_of(runs, 'rollout/forwards_per_response', tail_mean):.2f} | "
            f"{mean_of(runs, 'rollout/distinct_texts_per_group', lambda v: v[0]):.2f} → "
            f"{mean_of(runs, 'rollout/distinct_texts_per_group', tail_mean):.2f} | "
            f"{_or_dash(mean_of(runs, 'rollout/tpf_var_between_texts_correct', avg))} |"
        )
    return "\n".join(lines)


def plotted_styles(tags) -> list[str]:
    """The ``style/<name>`` curves a style plot draws: every style but ``other``, except that of exactly two
    styles only the second is drawn (the first is its complement, up to ``other``)."""
    styles = sorted(t for t in tags if t.startswith("style/") and t != "style/other")
    return styles[1:] if len(styles) == 2 else styles


def plot_styles(curves: dict[str, list[dict]], path: Path) -> None:
    """Share of each answer style in the rollouts over RL steps, one line per method and style (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, runs in curves.items():
        for tag in plotted_styles({t for r in runs for t in r}):
            series = [r[tag] for r in runs if tag in r]
            n = min(len(v) for v in series)
            ax.plot(range(1, n + 1), [statistics.fmean(v[i] for v in series) for i in range(n)],
                    label=f"{name}: {tag[6:]}", alpha=0.8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("share of rollouts")
    ax.set_ylim(0, 1)
    ax.set_title("answer styles sampled during RL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def frontiers(results: dict[str, list[list[dict]]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per method: (TPF, accuracy) of every sweep point, means over seeds, sorted by TPF (the plotted curves)."""
    out = {}
    for name, runs in results.items():
        settings = [p["setting"] for p in runs[0]]
        tpf = [statistics.fmean(r[i]["tpf"] for r in runs) for i in range(len(settings))]
        acc = [statistics.fmean(r[i]["accuracy"] for r in runs) for i in range(len(settings))]
        order = sorted(range(len(tpf)), key=tpf.__getitem__)
        out[name] = ([tpf[i] for i in order], [acc[i] for i in order])
    return out


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    """method.png: every method's accuracy–TPF curve over its sweep on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name, (tpf, acc) in frontiers(results).items():
        # planner methods dashed: their sweep is the planner's p threshold, not the confidence threshold φ
        ax.plot(tpf, acc, "s--" if name in PLANNER_METHODS else "o-", label=name, alpha=0.8)
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("held-out synthetic arithmetic, greedy sweeps (φ; dashed: planner p)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None,
                    help="RL config(s), merged in order like `lrl fit --config` (default: configs/quickstart.yaml)")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="run only these methods (names as in the table; the SFT base is always evaluated)")
    ap.add_argument("--fit-arg", action="append", default=[], metavar="ARG",
                    help="extra `lrl fit` argument for every run (repeatable): --fit-arg=--model.init_args.lr=1e-5")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--dultra", action="store_true", help=f"add the dUltra methods {list(PLANNER_METHODS)}")
    ap.add_argument("--planner-init", default=None, metavar="DIR",
                    help="SFT base + imitation-fitted planner head (default: <out>/planner_init/base, built by "
                         "scripts/dultra_imitation.py when missing, reused when present)")
    ap.add_argument("--imitation-prompts", type=int, default=256, help="training prompts of the imitation fit")
    ap.add_argument("--imitation-steps", type=int, default=1500, help="optimizer steps of the imitation fit")
    ap.add_argument("--rl-steps", type=int, default=None, help="RL steps per run (default: the quickstart's)")
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--out", default="outputs/bench")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="instead of running: merge the method.json of these dirs (e.g. one per seed) into --out")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.merge:
        payload = merge_runs([json.loads((Path(d) / "method.json").read_text()) for d in args.merge])
        print(write_outputs(payload, Path(args.out)))
        return 0

    import torch

    torch.set_num_threads(1)
    from lrl.config_files import merged_config
    from lrl.models import load_checkpoint
    from lrl.tasks import get_task

    configs = args.config or ["configs/quickstart.yaml"]
    cfg = merged_config(configs)
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    base_dir = Path(cfg["checkpoint"])
    if not (base_dir / "config.json").exists():
        raise SystemExit(f"no base checkpoint at {base_dir}: build it with scripts/build_base.py (README, "
                         "'Measured figures'); the block-8 demo base is committed in outputs/base/sft_tiny")
    task = get_task(data["task"], **{**data.get("task_kwargs", {}), "eval_seed": data.get("eval_seed", 1)})
    records = task.load("test")[: args.eval_size]
    thresholds, block, max_new = list(model["eval"]["thresholds"]), cfg["block_size"], model["eval"]["max_new_tokens"]
    select = float(data.get("threshold", 0.9))
    methods: dict = dict(METHODS, **(ABLATIONS if args.ablations else {}),
                         **(PLANNER_METHODS if args.dultra else {}))
    if args.methods:
        known = {**METHODS, **ABLATIONS, **PLANNER_METHODS}
        unknown = sorted(set(args.methods) - set(known))
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; known: {list(known)}")
        methods = {k: v for k, v in known.items() if k in args.methods or (args.dultra and k in PLANNER_METHODS)}
    out = Path(args.out)
    results: dict[str, list[list[dict]]] = {"SFT base": []}
    base_lm, tok = load_checkpoint(base_dir, block_size=block)
    base_pts = evaluate(base_lm, tok, task, records, thresholds, block, max_new)
    timings, curves = {}, {}
    dultra = [k for k in methods if k in PLANNER_METHODS]
    if dultra:  # one imitation-fitted head on the SFT base, shared by every seed (and cached on disk)
        pcfg = merged_config([*configs, PLANNER_CONFIG])
        p_args = planner_args(pcfg)
        p_ts = sorted({*(pcfg["model"]["init_args"].get("eval") or {}).get("planner_thresholds", ()), PLANNER_SELECT},
                      reverse=True)
        init_kw = dict(threshold=select, block=block, max_new=max_new, eval_size=args.eval_size,
                       prompts=args.imitation_prompts, steps=args.imitation_steps)
        base_init = planner_init(base_dir, Path(args.planner_init or out / "planner_init" / "base"), **init_kw)
        init_pts = evaluate(load_checkpoint(base_init, block_size=block)[0], tok, task, records, [], block,
                            max_new, p_ts)
        results[PLANNER_BASE] = []
    stage1: dict[tuple[str, int], object] = {}  # (method, seed) → policy, for "LightningRL → planner"
    for seed in args.seeds:
        results["SFT base"].append(base_pts)  # deterministic: the same points for every seed
        if dultra:
            results[PLANNER_BASE].append(init_pts)
        for name, extra in methods.items():
            start = time.perf_counter()
            slug = name.replace(" ", "_").replace("→", "to").replace(",", "")
            run_dir = out / "runs" / f"{slug}_s{seed}"
            if name in PLANNER_METHODS:
                first, extra = PLANNER_METHODS[name]
                init = base_init
                if first is not None:  # train `first`, export it, fit a head on it by imitation
                    pre = out / "runs" / f"{slug}_s{seed}_stage1"  # beside run_dir: run_curves reads all of run_dir
                    prev = stage1.get((first, seed)) or train([*METHODS[first], *args.fit_arg], seed, args.rl_steps,
                                                              pre, configs)
                    from lrl.models import save_checkpoint

                    save_checkpoint(prev, pre / "export", tokenizer=tok)
                    init = planner_init(pre / "export", pre / "planner_init", **init_kw)
                policy = train([*p_args, f"--checkpoint={init}", f"--block_size={block}", *extra, *args.fit_arg],
                               seed, args.rl_steps, run_dir, configs)
                pts = evaluate(policy, tok, task, records, [], block, max_new, p_ts)
            else:
                policy = train([*extra, *args.fit_arg], seed, args.rl_steps, run_dir, configs)
                if any(PLANNER_METHODS[k][0] == name for k in dultra):
                    stage1[(name, seed)] = policy
                pts = evaluate(policy, tok, task, records, thresholds, block, max_new)
            results.setdefault(name, []).append(pts)
            timings.setdefault(name, []).append(time.perf_counter() - start)
            curves.setdefault(name, []).append(run_curves(run_dir))
            print(f"[{name} seed {seed}] {results[name][-1]} ({timings[name][-1]:.0f} s)", flush=True)
            done = {k: v for k, v in results.items() if len(v) == len(results["SFT base"])}
            write_outputs({"results": done, "timings_s": timings, "curves": curves,  # partial results survive
                           "seeds": args.seeds[: len(done["SFT base"])], "select_threshold": select,
                           "configs": configs, "fit_args": args.fit_arg}, out / "partial")
    table = write_outputs({"results": results, "timings_s": timings, "curves": curves, "seeds": args.seeds,
                           "select_threshold": select, "configs": configs, "fit_args": args.fit_arg}, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
