"""dUltra imitation init: give a base checkpoint a planner head that reproduces greedy threshold decoding at φ.

Teacher rollouts are the base's own greedy ``low_confidence_dynamic`` decodes of training prompts; the head is fitted
by `lrl.algorithms.planner_imitation`; the checkpoint is written with its head (planner_head.safetensors), so
`lrl fit --config configs/dultra.yaml --checkpoint <out>` starts RL from today's behaviour. Finally the held-out
split is decoded both ways (same greedy settings): accuracy, TPF, teacher-forced step agreement and trajectory
agreement are printed and written to <out>_imitation.json.

    python scripts/dultra_imitation.py --checkpoint outputs/base/styles_b16 --out outputs/base/styles_b16_planner
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    import torch

    from lrl.algorithms.planner_imitation import (
        decision_agreement,
        fit_imitation,
        imitation_examples,
        step_agreement,
    )
    from lrl.models import load_checkpoint, save_checkpoint
    from lrl.models.generation import checkpoint_stop_ids
    from lrl.models.planner import PlannerConfig, PlannerHead
    from lrl.rollout import NativeEngine, SamplingParams
    from lrl.tasks import get_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.9, help="φ of the teacher's threshold rule")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--train-prompts", type=int, default=256)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--inner-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    lm, tok = load_checkpoint(args.checkpoint)
    lm.eval()
    lm.planner = PlannerHead(PlannerConfig(hidden_size=lm.hf_config.hidden_size, inner_size=args.inner_size))
    task = get_task("synthetic", num_train=2000, num_eval=args.eval_prompts, styles={"chain": 0.7, "padded": 0.3})
    train = task.load("train")[: args.train_prompts]
    held = task.load("test")[: args.eval_prompts]
    eng = NativeEngine(lm, tok)
    common = dict(block_size=args.block_size, greedy=True, max_new_tokens=args.max_new_tokens,
                  stop_token_ids=checkpoint_stop_ids(args.checkpoint, tok))
    teacher = SamplingParams(remasking_strategy="low_confidence_dynamic", threshold=args.threshold, **common)
    planner = SamplingParams(remasking_strategy="planner", **common)

    t0 = time.perf_counter()
    examples = imitation_examples(lm, eng.generate([task.prompt(r) for r in train], teacher),
                                  block_size=args.block_size, pad_id=tok.pad_token_id)
    losses = fit_imitation(lm.planner, *examples, block_size=args.block_size, steps=args.steps)
    fit_s = time.perf_counter() - t0
    save_checkpoint(lm, args.out, tokenizer=tok)

    prompts = [task.prompt(r) for r in held]
    result = {"checkpoint": args.checkpoint, "out": args.out, "threshold": args.threshold,
              "examples": int(examples[0].shape[0]), "loss_first": losses[0], "loss_last": losses[-1],
              "fit_s": round(fit_s, 1)}
    runs = {}
    for name, sp in (("teacher", teacher), ("planner", planner)):
        batch = eng.generate(prompts, sp)
        scores = task.score(batch.texts, held)
        runs[name] = batch
        result[name] = {"accuracy": 100.0 * sum(float(s) >= 1.0 for s in scores) / len(scores),
                        "tpf": round(batch.batch_tpf, 3)}
    result["step_agreement"] = step_agreement(lm, runs["teacher"], block_size=args.block_size,
                                              pad_id=tok.pad_token_id)
    result["trajectory_agreement"] = decision_agreement(runs["planner"], runs["teacher"])
    Path(f"{args.out}_imitation.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
