"""One RL step's rewards, filters and advantages for every shipped config's reward settings, pinned on a hand-made
set of prompt groups (written before the reward terms / pipeline refactor and run on the code before it: the
numbers are the contract, the way a config spells them may change).

Five prompt patterns of G = 4 responses (accuracy from the verifier, tokens per forward = length / forwards):

    p0  acc 1 0 1 0   TPF 2 1 3 2            forwards 4 8 2 4
    p1  acc 0 0 0 0   TPF 1 2 1 2            forwards 8 4 8 4       all wrong
    p2  acc 1 1 0 1   TPF 2 2.005 2 2.004    forwards 4 200 4 250   TPF range 0.005 < 0.01
    p3  acc 1 1 1 1   TPF 1 2 3 4            forwards 8 4 2 2       response 0's worked steps do not hold
    p4  acc 1 1 0 0   TPF 1 1.5 1 3          forwards 8 6 8 3       response 0 hit the length limit (→ wrong)

Prompts are drawn in the order p0, p1, ... with ``prompts_per_step = 3``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from lrl.rollout.base import RolloutGenerator
from lrl.rollout.types import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]
G = 4
# per pattern: (accuracy, lengths, forwards, finish reasons, worked steps hold)
PATTERNS = {
    0: ([1, 0, 1, 0], [8, 8, 6, 8], [4, 8, 2, 4], ["stop"] * 4, [True] * 4),
    1: ([0, 0, 0, 0], [8, 8, 8, 8], [8, 4, 8, 4], ["stop"] * 4, [True] * 4),
    2: ([1, 1, 0, 1], [8, 401, 8, 501], [4, 200, 4, 250], ["stop"] * 4, [True] * 4),
    3: ([1, 1, 1, 1], [8, 8, 6, 8], [8, 4, 2, 2], ["stop"] * 4, [False, True, True, True]),
    4: ([1, 1, 0, 0], [8, 9, 8, 9], [8, 6, 8, 3], ["length", "stop", "stop", "stop"], [True] * 4),
}


def _text(p: int, j: int) -> str:
    acc, _, _, _, hold = PATTERNS[p]
    return f"p{p}/{j}|{acc[j]}|{'ok' if hold[j] else 'bad'}"


class _Gen(RolloutGenerator):
    weight_version = 0

    def update_weights(self, weights, version=None):
        self.weight_version = version

    def generate(self, prompts, sampling):
        rows = [(int(p[1:]), j) for p in prompts for j in range(G)]
        return RolloutBatch(
            prompt_ids=[[1]] * len(rows),
            response_ids=[[5] * PATTERNS[p][1][j] for p, j in rows],
            texts=[_text(p, j) for p, j in rows],
            step_maps=[[1] * PATTERNS[p][1][j] for p, j in rows],
            num_forwards=torch.tensor([PATTERNS[p][2][j] for p, j in rows]),
            num_store_passes=torch.zeros(len(rows), dtype=torch.long),
            finish_reasons=[PATTERNS[p][3][j] for p, j in rows],
            group_index=torch.arange(len(prompts)).repeat_interleave(G),
        )


class _Task:
    def prompt(self, r):
        return f"p{r['i']}"

    def ground_truth(self, r):
        return ""

    def score(self, texts, records):
        return [float(t.split("|")[1]) for t in texts]

    def worked_steps_hold(self, text):
        return text.endswith("|ok")


class _Teacher:
    """Stands in for `lrl.rewards.distill.TeacherScorer`: −(response index + 1) / (prompt index + 2)."""

    def __init__(self, checkpoint, **kw):
        pass

    def score(self, prompts, completions):
        return torch.tensor([-(int(c.split("|")[0].split("/")[1]) + 1) / (int(p[1:]) + 2)
                             for p, c in zip(prompts, completions)], dtype=torch.float32)


def _stack(name):
    import yaml

    path = ROOT / "configs" / name
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return [path] if "class_path" in model else [ROOT / "configs" / "lightningrl.yaml", path]


def _datamodule(tiny_checkpoint, configs, extra=()):
    """The shipped config's data module (prompts_per_step 3), with this file's generator, task and prompt order."""
    from lrl.cli import cli_main

    args = []
    for c in configs:
        args += ["--config", str(c)]
    args += ["--checkpoint", str(tiny_checkpoint), "--trainer.accelerator=cpu", "--trainer.devices=1",
             "--trainer.strategy=auto", "--trainer.precision=32-true", "--data.init_args.prompts_per_step=3", *extra]
    cli = cli_main(args, run=False)
    dm = cli.datamodule
    dm.task, dm.generator = _Task(), _Gen()
    dm.train_records = [{"i": i} for i in range(5)]
    dm._order = list(range(5))
    return dm


# ---------------------------------------------------------------- an independent reference, in plain Python
def _z(v):
    m, s = statistics.fmean(v), statistics.pstdev(v)
    return [0.0] * len(v) if s <= 1e-6 else [(x - m) / s for x in v]


def _minmax(v):
    lo, hi = min(v), max(v)
    return [0.5] * len(v) if hi - lo <= 1e-6 else [(x - lo) / (hi - lo) for x in v]


def _norm(v, mode, w=1.0):
    return [w * x for x in {"z_score": _z, "minmax": _minmax, "none": list}[mode](v)]


def _acc(p, worked_steps=False):
    acc, _, _, fin, hold = PATTERNS[p]
    return [0.0 if f == "length" or (worked_steps and not h) else float(a) for a, f, h in zip(acc, fin, hold)]


def _tpf(p):
    return [L / F for L, F in zip(PATTERNS[p][1], PATTERNS[p][2])]


def _total(p, acc_mode="pm1", tpf_mode="z_score", tpf_w=1.0, steps=None, distill=None, joint=False,
           worked_steps=False):
    a = _acc(p, worked_steps)
    if joint:
        base = [2 * x - 1 for x in a] if acc_mode == "pm1" else a
        out = _norm([x + tpf_w * t for x, t in zip(base, _tpf(p))], tpf_mode)
    else:
        acc = [2 * x - 1 for x in a] if acc_mode == "pm1" else _z(a) if acc_mode == "z_score" else a
        out = [x + t for x, t in zip(acc, _norm(_tpf(p), tpf_mode, tpf_w))]
    if steps is not None:  # (mode, scale): dUltra's −forwards / scale, normalised per group
        out = [x + s for x, s in zip(out, _norm([-f / steps[1] for f in PATTERNS[p][2]], steps[0]))]
    if distill is not None:  # (mode, weight)
        raw = [-(j + 1) / (p + 2) for j in range(G)]
        out = [x + d for x, d in zip(out, _norm(raw, distill[0], distill[1]))]
    return out


def _advantages(totals_per_group, mode):
    flat = [x for t in totals_per_group for x in t]
    if mode == "batch":
        m, s = statistics.fmean(flat), statistics.stdev(flat)
        return [(x - m) / s for x in flat]
    out = []
    for t in totals_per_group:  # prompt_group: the unbiased std within the group
        m, s = statistics.fmean(t), statistics.stdev(t)
        out += [(x - m) / max(s, 1e-8) for x in t]
    return out


# ---------------------------------------------------------------- what each shipped config does with the groups
PAPER = dict(acc_mode="pm1", tpf_mode="z_score")
CASES = {
    # config stack, extra args: kept prompts in order, rounds, drops (all wrong, TPF range), reward kwargs, adv mode
    "lightningrl": (["lightningrl.yaml"], (), [0, 3, 4], 2, (1, 1), PAPER, "batch"),
    "sdar_1p7b_1gpu": (["sdar_1p7b_1gpu.yaml"], (), [0, 3, 4], 2, (1, 1), PAPER, "batch"),
    "sdar_8b_b32": (["sdar_8b_b32.yaml"], (), [0, 3, 4], 2, (1, 1), PAPER, "batch"),
    # no TPF reward, TPF-range filter off: p2 kept, one refill round draws p3
    "grpo_traj": (["grpo_traj.yaml"], (), [0, 2, 3], 2, (1, 0), dict(acc_mode="pm1", tpf_mode="none", tpf_w=0.0),
                  "prompt_group"),
    # no refill: the step trains on p0 alone
    "lightningrl_released": (["lightningrl_released.yaml"], (), [0], 1, (1, 1), dict(acc_mode="z_score",
                                                                                     tpf_mode="z_score"), "batch"),
    # require_worked_steps: p3's response 0 counts wrong
    "quickstart": (["quickstart.yaml"], (), [0, 3, 4], 2, (1, 1), dict(PAPER, worked_steps=True), "batch"),
    "dultra": (["dultra.yaml"], (), [0, 3, 4], 2, (1, 1), dict(PAPER, steps=("z_score", 50.0)), "batch"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_config_shapes_filters_and_normalises_as_pinned(name, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs, extra, kept, rounds, drops, kw, adv_mode = CASES[name]
    dm = _datamodule(tiny_checkpoint, [p for c in configs for p in _stack(c)], extra)
    out = dm.next_batch()
    assert [t.split("/")[0] for t in out.texts[::G]] == [f"p{p}" for p in kept]
    assert out.stats["filter/rounds"] == rounds
    assert (out.stats["filter/dropped_all_wrong"], out.stats["filter/dropped_tpf_range"]) == drops
    totals = [_total(p, **kw) for p in kept]
    torch.testing.assert_close(out.rewards["total"].double(), torch.tensor([x for t in totals for x in t]).double(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.advantages.double(), torch.tensor(_advantages(totals, adv_mode)).double(),
                               rtol=0, atol=1e-5)


def test_paper_totals_by_hand(tiny_checkpoint, tmp_path, monkeypatch):
    """The paper profile's totals of p0 and p4, worked out by hand: ±1 accuracy + the group's z-scored TPF."""
    monkeypatch.chdir(tmp_path)
    out = _datamodule(tiny_checkpoint, _stack("lightningrl.yaml")).next_batch()
    r = 1 / math.sqrt(0.5)  # p0's TPF 2 1 3 2: mean 2, population std √0.5
    torch.testing.assert_close(out.rewards["total"][:4].double(), torch.tensor([1.0, -1 - r, 1 + r, -1.0]).double(),
                               rtol=0, atol=1e-6)
    # p4: response 0 truncated → wrong; TPF 1 1.5 1 3: mean 1.625, population variance 2.6875 / 4
    s = math.sqrt(2.6875 / 4)
    want = [-1 - 0.625 / s, 1 - 0.125 / s, -1 - 0.625 / s, -1 + 1.375 / s]
    torch.testing.assert_close(out.rewards["total"][8:].double(), torch.tensor(want).double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rewards["acc"][8:], torch.tensor([-1.0, 1.0, -1.0, -1.0]))
    torch.testing.assert_close(out.rewards["tpf_raw"][8:], torch.tensor([1.0, 1.5, 1.0, 3.0]))
    assert out.correct[8:].tolist() == [False, True, False, False]


# ---------------------------------------------------------------- ablations of scripts/bench_method.py and dUltra's
ACC, TPF = "{class_path: lrl.rewards.terms.Accuracy}", "{class_path: lrl.rewards.terms.TPF, init_args: {%s}}"
ABLATIONS = {
    # name: (config, the spelling in reward terms, its reward kwargs); the flat keys before the terms list in the
    # comments
    "joint_normalization": ("lightningrl.yaml", ("--data.init_args.joint_normalization=z_score",),  # =true
                            dict(PAPER, joint=True)),
    # tpf_reward=none tpf_coefficient=0.0
    "no_tpf_reward": ("lightningrl.yaml",
                      (f"--data.init_args.rewards=[{ACC}, {TPF % 'weight: 0.0, normalize: none'}]",),
                      dict(acc_mode="pm1", tpf_mode="none", tpf_w=0.0)),
    # tpf_reward=minmax tpf_coefficient=0.5
    "tpf_minmax_half": ("lightningrl.yaml",
                        (f"--data.init_args.rewards=[{ACC}, {TPF % 'weight: 0.5, normalize: minmax'}]",),
                        dict(acc_mode="pm1", tpf_mode="minmax", tpf_w=0.5)),
    # step_penalty=sqrt step_penalty_norm=none distill_teacher=/nonexistent/teacher distill_coefficient=0.5
    "dultra_sqrt_distill": ("dultra.yaml", (
        f"--data.init_args.rewards=[{ACC}, {TPF % 'normalize: z_score'}, {{class_path: lrl.rewards.terms.PlannerSteps, "
        "init_args: {kind: sqrt, normalize: none}}, {class_path: lrl.rewards.terms.Distill, init_args: "
        "{teacher: /nonexistent/teacher, weight: 0.5}}]",), dict(PAPER, distill=("z_score", 0.5))),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_rewards_as_pinned(name, tiny_checkpoint, tmp_path, monkeypatch):
    import lrl.rewards.distill

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lrl.rewards.distill, "TeacherScorer", _Teacher)
    config, extra, kw = ABLATIONS[name]
    out = _datamodule(tiny_checkpoint, _stack(config), extra).next_batch()
    kept = [0, 3, 4]
    totals = [_total(p, **kw) for p in kept]
    if name == "dultra_sqrt_distill":  # sqrt penalty, unnormalised: −√forwards / 50
        totals = [[x - math.sqrt(f) / 50 for x, f in zip(t, PATTERNS[p][2])] for t, p in zip(totals, kept)]
        assert "distill_raw" in out.rewards and "steps" in out.rewards
    torch.testing.assert_close(out.rewards["total"].double(), torch.tensor([x for t in totals for x in t]).double(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(out.advantages.double(), torch.tensor(_advantages(totals, "batch")).double(),
                               rtol=0, atol=1e-5)
