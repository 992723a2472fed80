"""Record greedy outputs of the native engine on the tiny models, as exact regression data for engine rewrites.

`tests/data/engine_golden.json` was written by this script from the dense-cache engine of d683b5f (before the paged
engine), so tests can check that the paged, continuously batched engine returns exactly what it returned. Greedy only:
sampled draws come from per-row keyed streams since the paged engine (a group's samples no longer depend on the other
rows of a forward), so they changed by design.

    python scripts/record_engine_golden.py --out tests/data/engine_golden.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lrl.models import build_char_tokenizer, build_tiny_model
from lrl.models.planner import PlannerConfig, PlannerHead
from lrl.rollout import NativeEngine, SamplingParams

PROMPTS = ["Q: 12+7=?\nA: ", "hi", "The quick brown fox", "abcdefgh", "x=3; y=x*x; print(y)", "Q: 5*6=?\nA: ",
           "a much longer prompt than the others, to stress different lengths"]

CASES = {
    "dyn-0.9-b4": dict(block_size=4, threshold=0.9, max_new_tokens=20),
    "dyn-0.019-b8-g3": dict(block_size=8, threshold=0.019, max_new_tokens=24, samples_per_prompt=3),
    "dyn-0.0-b4": dict(block_size=4, threshold=0.0, max_new_tokens=13),
    "static-k2": dict(block_size=4, remasking_strategy="low_confidence_static", denoising_steps=2, max_new_tokens=16),
    "sequential-k2-b8": dict(block_size=8, remasking_strategy="sequential", denoising_steps=4, max_new_tokens=20),
    "stop-truncate": dict(block_size=8, threshold=0.018, max_new_tokens=32, stop_token_ids=[79, 8, 99],
                          samples_per_prompt=2),
    "stop-keep-block": dict(block_size=8, threshold=0.018, max_new_tokens=32, stop_token_ids=[79, 8, 99],
                            eos_policy="keep_final_block", samples_per_prompt=2),
    "planner": dict(block_size=4, remasking_strategy="planner", planner_threshold=0.5, max_new_tokens=16),
}
MODELS = ("plain", "shift")


def build(kind: str, tok):
    lm = build_tiny_model(tok, block_size=4, logit_shift=kind == "shift", seed=0 if kind == "plain" else 2).eval()
    torch.manual_seed(1)
    head = PlannerHead(PlannerConfig(hidden_size=lm.hf_config.hidden_size, inner_size=16, init_bias=0.0))
    with torch.no_grad():
        head.fc2.weight.normal_(0, 1.0)
    lm.planner = head.eval()
    return lm


def record() -> dict:
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    out = {}
    for kind in MODELS:
        eng = NativeEngine(build(kind, tok), tok)
        for name, kw in CASES.items():
            b = eng.generate(PROMPTS, SamplingParams(greedy=True, **kw))
            out[f"{kind}/{name}"] = dict(
                response_ids=b.response_ids, step_maps=b.step_maps, num_forwards=b.num_forwards.tolist(),
                num_store_passes=b.num_store_passes.tolist(), finish_reasons=b.finish_reasons,
                sampling_logprobs=b.sampling_logprobs, tail_ids=b.tail_ids, tail_step_maps=b.tail_step_maps,
                planner_logprobs=b.planner_logprobs)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("tests/data/engine_golden.json"))
    args = ap.parse_args()
    data = record()
    args.out.write_text(json.dumps({"cases": CASES, "prompts": PROMPTS, "outputs": data}))
    stops = sum(r == "stop" for v in data.values() for r in v["finish_reasons"])
    print(f"wrote {args.out}: {len(data)} runs, {stops} responses ended by a stop id")
