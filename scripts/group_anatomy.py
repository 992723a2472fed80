"""What the TPF reward sees: statistics of sampled rollout groups, per answer style (issue #12).

Samples ``--group-size`` answers for each of the first ``--prompts`` training problems of the multi-style synthetic
task at threshold φ and temperature T (what RL rollouts see) and reports:

* per style: samples, accuracy, TPF, forwards and tokens per answer;
* the share of the within-group TPF variance that lies between different texts, over all answers and over the
  correct ones (`lrl.metrics.diagnostics`): the part of what the z-scored TPF reward ranks that is a property of
  the answer rather than the luck of one sample's unmasking order;
* in groups that mix styles, each style's mean within-group z-score of TPF and of −forwards: which style the TPF
  reward prefers, and which one a reward on forwards (latency) would;
* in groups with correct answers of a style and of ``--reference``, the mean paired difference (style −
  reference) of TPF, forwards and tokens: the choice the task offers *within* a problem, which averages over
  all problems can hide;
* the mean TPF of correct and of wrong answers, and how many groups mixing right and wrong answers give a wrong
  answer the highest total reward (±1 + z(TPF)).

    python scripts/group_anatomy.py --checkpoint outputs/base/styles_b16 [--prompts 128] [--group-size 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lrl.algorithms.reward_shaping import accuracy_reward, group_normalize  # noqa: E402
from lrl.metrics.diagnostics import rollout_diagnostics  # noqa: E402


def group_anatomy(texts, tpf, forwards, lengths, correct, styles, group_size: int, reference: str = "chain") -> dict:
    """The statistics listed in the module docstring for N = groups × ``group_size`` samples, grouped by
    consecutive runs of ``group_size``.

    Args:
        texts, styles: N answers and their style labels.
        tpf, forwards, lengths: N floats / ints per answer.
        correct: N bools (the verifier's verdicts).
        group_size: samples per prompt.
        reference: the style paired differences are taken against.
    """
    n = len(texts)
    if group_size < 1 or n % group_size or not (len(tpf) == len(forwards) == len(lengths) == len(correct)
                                               == len(styles) == n):
        raise ValueError(f"group_anatomy: need equal lengths divisible by group_size={group_size}, got {n} texts")
    groups = [list(range(g, g + group_size)) for g in range(0, n, group_size)]
    per_style: dict[str, dict] = {}
    for style in sorted(set(styles)):
        rows = [i for i in range(n) if styles[i] == style]
        per_style[style] = {
            "samples": len(rows),
            "accuracy": statistics.fmean(float(correct[i]) for i in rows),
            "tpf": statistics.fmean(tpf[i] for i in rows),
            "forwards": statistics.fmean(forwards[i] for i in rows),
            "tokens": statistics.fmean(lengths[i] for i in rows),
        }
    group_index = torch.arange(n) // group_size
    tpf_t, correct_t = torch.tensor(tpf, dtype=torch.float), torch.tensor(correct)
    diag = rollout_diagnostics(texts, tpf_t, torch.tensor(forwards), torch.tensor(lengths), group_index,
                               correct=correct_t)
    # the reward's own terms: z-scores within each group (0 for a flat group) and ±1 + z(TPF) (spec §3.3)
    z_of = {"tpf": group_normalize(tpf_t, group_index).tolist(),
            "neg_forwards": group_normalize(-torch.tensor(forwards, dtype=torch.float), group_index).tolist()}
    total = (accuracy_reward(correct_t, group_index) + group_normalize(tpf_t, group_index)).tolist()
    z_by_style = {key: defaultdict(list) for key in z_of}
    paired: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    mixed_outcome = wrong_on_top = 0
    for rows in groups:
        if len({styles[i] for i in rows}) > 1:
            for key, z in z_of.items():
                if any(z[i] != 0.0 for i in rows):  # a flat group ranks nothing
                    for i in rows:
                        z_by_style[key][styles[i]].append(z[i])
        ref = [i for i in rows if correct[i] and styles[i] == reference]
        for style in {styles[i] for i in rows} - {reference}:
            other = [i for i in rows if correct[i] and styles[i] == style]
            if ref and other:
                for key, values in (("tpf", tpf), ("forwards", forwards), ("tokens", lengths)):
                    paired[style][key].append(statistics.fmean(values[i] for i in other)
                                              - statistics.fmean(values[i] for i in ref))
        if 0 < sum(bool(correct[i]) for i in rows) < len(rows):
            mixed_outcome += 1
            wrong_on_top += not correct[max(rows, key=total.__getitem__)]
    return {
        "per_style": per_style,
        "distinct_texts_per_group": diag["rollout/distinct_texts_per_group"],
        "tpf_var_between_texts": diag.get("rollout/tpf_var_between_texts"),
        "tpf_var_between_texts_correct": diag.get("rollout/tpf_var_between_texts_correct"),
        "mixed_style_groups": sum(len({styles[i] for i in rows}) > 1 for rows in groups),
        **{f"z_{key}_in_mixed_groups": {s: statistics.fmean(v) for s, v in sorted(by_style.items())}
           for key, by_style in z_by_style.items()},
        "paired_vs_reference": {s: {"groups": len(d["tpf"]), **{k: statistics.fmean(v) for k, v in d.items()}}
                                for s, d in sorted(paired.items())},
        "tpf_correct": statistics.fmean([tpf[i] for i in range(n) if correct[i]] or [float("nan")]),
        "tpf_wrong": statistics.fmean([tpf[i] for i in range(n) if not correct[i]] or [float("nan")]),
        "groups_right_and_wrong": mixed_outcome,
        "groups_where_a_wrong_answer_tops_the_reward": wrong_on_top,
    }


def format_group_anatomy(res: dict, reference: str = "chain") -> str:
    lines = ["| style | samples | acc % | TPF | forwards | tokens | z(TPF) in mixed groups | z(−forwards) in mixed "
             f"groups | paired vs correct `{reference}`: groups, ΔTPF, Δforwards, Δtokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for style, s in res["per_style"].items():
        p = res["paired_vs_reference"].get(style)
        pair = f"{p['groups']}, {p['tpf']:+.2f}, {p['forwards']:+.2f}, {p['tokens']:+.2f}" if p else "-"
        zt, zf = res["z_tpf_in_mixed_groups"].get(style), res["z_neg_forwards_in_mixed_groups"].get(style)
        lines.append(f"| {style} | {s['samples']} | {100 * s['accuracy']:.1f} | {s['tpf']:.2f} | {s['forwards']:.2f} | "
                     f"{s['tokens']:.1f} | {'-' if zt is None else f'{zt:+.2f}'} | "
                     f"{'-' if zf is None else f'{zf:+.2f}'} | {pair} |")
    share = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines.append(f"\ndistinct texts per group {res['distinct_texts_per_group']:.2f}; share of the within-group TPF "
                 f"variance between different texts: {share(res['tpf_var_between_texts'])} (all answers), "
                 f"{share(res['tpf_var_between_texts_correct'])} (correct answers); groups mixing styles "
                 f"{res['mixed_style_groups']}; TPF of correct / wrong answers {res['tpf_correct']:.2f} / "
                 f"{res['tpf_wrong']:.2f}; a wrong answer tops the reward (±1 + z(TPF)) in "
                 f"{res['groups_where_a_wrong_answer_tops_the_reward']} of {res['groups_right_and_wrong']} groups "
                 "with right and wrong answers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", type=int, default=128, help="first N training problems")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--family", default="chains", help="problem family of the synthetic task (chains, sums)")
    ap.add_argument("--styles", default='{"chain": 0.7, "padded": 0.3}', help="task styles as JSON")
    ap.add_argument("--reference", default="chain", help="style the paired differences are taken against")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    from lrl.atomic import atomic_write
    from lrl.models import load_checkpoint
    from lrl.rollout import NativeEngine, SamplingParams
    from lrl.tasks import get_task

    torch.set_num_threads(1)
    lm, tok = load_checkpoint(args.checkpoint)
    lm.eval()
    task = get_task("synthetic", styles=json.loads(args.styles), family=args.family)
    records = task.load("train")[: args.prompts]
    sp = SamplingParams(block_size=lm.bd.block_size, greedy=False, max_new_tokens=args.max_new_tokens,
                        stop_token_ids=(tok.eos_token_id,), threshold=args.threshold,
                        denoising_steps=lm.bd.block_size, remasking_strategy="low_confidence_dynamic",
                        samples_per_prompt=args.group_size, temperature=args.temperature, seed=args.seed)
    out = NativeEngine(lm, tok).generate([task.prompt(r) for r in records], sp)
    correct = [s >= 1.0 for s in task.score(out.texts, [r for r in records for _ in range(args.group_size)])]
    res = group_anatomy(out.texts, out.tpf.tolist(), out.num_forwards.tolist(), out.response_lengths.tolist(),
                        correct, [task.response_style(t) for t in out.texts], args.group_size, args.reference)
    print(format_group_anatomy(res, args.reference))
    if args.out:
        atomic_write(Path(args.out), json.dumps(res, indent=1).encode())
    return res


if __name__ == "__main__":
    main()
