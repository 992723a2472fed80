"""Where the forwards go: which characters of an answer wait, per answer style, under threshold decoding.

For a character-level synthetic base, decodes held-out problems (greedy, or ``--samples`` temperature-1 samples per
problem) at threshold φ and labels every character of every answer by role (`lrl.tasks.answer_styles.answer_roles`:
``operand`` copied from the question, ``carried`` copy of an earlier result, computed ``result``, ``layout``; the
positions after the text, e.g. end-of-text tokens, are ``stop``). Per style it reports forwards per response, the
fewest a decoder computing one step of the chain per forward could take (``floor``,
`lrl.tasks.answer_styles.forward_floor`), the forwards that unmask a single token (the sequential part of
decoding) and which role that token had, and per role the mean step inside its block at which it was unmasked
(1 = the block's first forward), and how many ``other`` answers mix two styles or are malformed
(`lrl.tasks.answer_styles.other_kind`). A style is faster on the model only if its roles are unmasked earlier;
this is how the layout hypotheses of the multi-style task were tested (README, "Multi-style task").

    python scripts/forward_anatomy.py --checkpoint outputs/base/styles_b16 [--threshold 0.9] [--samples 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrl.tasks.answer_styles import (  # noqa: E402
    OTHER,
    ROLES,
    answer_roles,
    dependency_levels,
    forward_floor,
    other_kind,
)

ALL_ROLES = (*ROLES, "stop")


def anatomy(texts, step_maps, prompt_lens, block_size: int, styles) -> dict[str, dict]:
    """Per style: responses, forwards, their one-step-per-forward floor and single-token forwards per response,
    single-token forwards by role per response, and per role the mean in-block step of unmasking and its token
    count.

    Args:
        texts: N decoded answers, one character per response token (positions past the text are ``stop``).
        step_maps: N lists, the 1-based denoising forward that unmasked each response token (RolloutBatch).
        prompt_lens: N prompt lengths in tokens (blocks are aligned to absolute positions).
        block_size: tokens per block.
        styles: N style names.
    """
    acc: dict[str, dict] = defaultdict(lambda: {"responses": 0, "forwards": 0, "floor": 0, "single": 0,
                                               "single_by_role": Counter(), "step_sum": Counter(),
                                               "count": Counter()})
    for text, steps, plen, style in zip(texts, step_maps, prompt_lens, styles):
        roles = answer_roles(text)[: len(steps)] + ["stop"] * (len(steps) - len(text))
        blocks = [(plen + j) // block_size for j in range(len(steps))]
        first = {}
        for b, s in zip(blocks, steps):
            first[b] = min(first.get(b, s), s)
        a = acc[style]
        a["responses"] += 1
        per_step = Counter(steps)
        a["forwards"] += len(per_step)
        a["floor"] += forward_floor(dependency_levels(text), plen, block_size, length=len(steps))
        for role, b, s in zip(roles, blocks, steps):
            a["step_sum"][role] += s - first[b] + 1
            a["count"][role] += 1
            if per_step[s] == 1:
                a["single"] += 1
                a["single_by_role"][role] += 1
    out = {}
    for style, a in acc.items():
        n = a["responses"]
        out[style] = {
            "responses": n,
            "forwards_per_response": a["forwards"] / n,
            "floor_forwards_per_response": a["floor"] / n,
            "single_token_forwards_per_response": a["single"] / n,
            "single_token_forwards_by_role": {r: a["single_by_role"][r] / n for r in ALL_ROLES if a["count"][r]},
            "mean_block_step_by_role": {r: a["step_sum"][r] / a["count"][r] for r in ALL_ROLES if a["count"][r]},
            "tokens_per_response_by_role": {r: a["count"][r] / n for r in ALL_ROLES if a["count"][r]},
        }
    return out


def format_anatomy(result: dict[str, dict]) -> str:
    head = "| style | responses | forwards/resp. | floor | 1-token forwards/resp. | " + " | ".join(
        f"{r}: tokens, mean block step, 1-token fwd" for r in ALL_ROLES) + " |"
    lines = [head, "|" + "---|" * (5 + len(ALL_ROLES))]
    for style, r in result.items():
        cells = []
        for role in ALL_ROLES:
            if role in r["mean_block_step_by_role"]:
                cells.append(f"{r['tokens_per_response_by_role'][role]:.1f}, {r['mean_block_step_by_role'][role]:.2f}, "
                             f"{r['single_token_forwards_by_role'].get(role, 0.0):.2f}")
            else:
                cells.append("-")
        lines.append(f"| {style} | {r['responses']} | {r['forwards_per_response']:.2f} | "
                     f"{r['floor_forwards_per_response']:.2f} | "
                     f"{r['single_token_forwards_per_response']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--samples", type=int, default=0, help="temperature-1 samples per problem (0: greedy)")
    ap.add_argument("--num-eval", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--family", default="chains", help="problem family of the synthetic task (chains, sums)")
    ap.add_argument("--styles", default='{"chain": 0.7, "padded": 0.3}',
                    help="task styles as JSON (only the classifier and the problem set depend on them)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

    import torch

    from lrl.atomic import atomic_write
    from lrl.models import load_checkpoint
    from lrl.rollout import NativeEngine, SamplingParams
    from lrl.tasks import get_task

    torch.set_num_threads(1)
    lm, tok = load_checkpoint(args.checkpoint)
    lm.eval()
    task = get_task("synthetic", num_eval=args.num_eval, styles=json.loads(args.styles), family=args.family)
    records = task.load("test")[: args.num_eval]
    greedy = args.samples == 0
    sp = SamplingParams(block_size=lm.bd.block_size, greedy=greedy, max_new_tokens=args.max_new_tokens,
                        stop_token_ids=(tok.eos_token_id,), threshold=args.threshold,
                        denoising_steps=lm.bd.block_size, remasking_strategy="low_confidence_dynamic",
                        samples_per_prompt=1 if greedy else args.samples, temperature=1.0, seed=0)
    out = NativeEngine(lm, tok).generate([task.prompt(r) for r in records], sp)
    if any(len(t) > len(s) for t, s in zip(out.texts, out.step_maps)):
        raise SystemExit("--checkpoint: forward_anatomy needs a character-level tokenizer (one token per character)")
    styles = [task.response_style(t) for t in out.texts]
    result = anatomy(out.texts, out.step_maps, [len(p) for p in out.prompt_ids], lm.bd.block_size, styles)
    print(format_anatomy(result))
    others = Counter(other_kind(t) for t, style in zip(out.texts, styles) if style == OTHER)
    result["other_kinds"] = {kind: others.get(kind, 0) for kind in ("mixed", "malformed")}
    print(f"`other` answers: {others.get('mixed', 0)} mixing styles, {others.get('malformed', 0)} malformed")
    if args.out:
        atomic_write(Path(args.out), json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    main()
