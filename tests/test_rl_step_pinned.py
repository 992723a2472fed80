"""One RL step of each shipped loss family, pinned to the numbers of the code before issue 31's refactor.

`LightningRLModule.training_step` (the real Lightning loop, optimizer, scheduler and logging) runs once on a
hand-built `RolloutBatch` of the tiny model, with the loss knobs of configs/lightningrl.yaml, grpo_traj.yaml,
lightningrl_released.yaml, dultra.yaml (planner ``separate`` and ``joint``), configs/algorithm/masked_states.yaml
and planner_only.yaml. The logged loss terms, the gradient norm and a few parameters after the step were recorded
from main's code at 6db9831 (before the loss knobs became one group and ``training_step`` was split); the refactor
must reproduce them. Two minibatches, so the old-log-prob pass and a second optimizer step (whose loss depends on
the first step's update) run, twice (two PPO epochs); the KL against the frozen reference is on (β > 0) where the
profile has it. The numbers were printed by this file's ``__main__`` on an export of 6db9831 (``git archive``) and
equal, to the last digit printed, those of the refactored code.
"""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.types import RolloutBatch, SamplingParams

BLOCK = 4
# a large step and two epochs over two minibatches: the second epoch revisits trained responses, so the clip binds
# (clip/low, clip/high > 0) and ε, ε_high matter; the shuffled order of epoch 2 is the RL step's seeded permutation
LR, EPOCHS = 1e-2, 2
# (prompt, response, step map): responses span 2-3 blocks of 4 (blocks are aligned to absolute positions), step ids
# 1..S with every step unmasking at least one position, as a planner rollout records them
ROWS = [
    ([5, 6, 7], [10, 11, 12, 13, 14, 15], [1, 2, 3, 2, 4, 4]),
    ([5, 6, 7], [20, 21, 22, 23, 24], [1, 2, 2, 3, 4]),
    ([8, 9], [30, 31, 32, 33, 34, 35, 36], [1, 1, 2, 3, 3, 4, 5]),
    ([8, 9], [40, 41, 42, 43], [1, 2, 2, 2]),
]
ADVANTAGES = [1.0, -0.5, 0.75, -0.25]
CORRECT = [True, False, True, False]
TOTAL_REWARD = [1.2, -0.3, 0.4, -1.0]  # nll_correct=reward_nonneg: responses 0 and 2


def _batch(planner: bool = False) -> RolloutBatch:
    n = len(ROWS)
    steps = [max(sm) for _, _, sm in ROWS]
    return RolloutBatch(
        prompt_ids=[list(p) for p, _, _ in ROWS], response_ids=[list(r) for _, r, _ in ROWS],
        texts=["x"] * n, step_maps=[list(sm) for _, _, sm in ROWS],
        num_forwards=torch.tensor(steps), num_store_passes=torch.zeros(n, dtype=torch.long),
        finish_reasons=["stop"] * n, group_index=torch.tensor([0, 0, 1, 1]),
        sampling=SamplingParams(block_size=BLOCK, temperature=1.0),
        # made-up rollout records: the decision ratios of the planner term are then not 1 at the first step
        planner_logprobs=[[-0.3 - 0.1 * s for s in range(k)] for k in steps] if planner else None,
        correct=torch.tensor(CORRECT), accuracy=torch.tensor(CORRECT, dtype=torch.float32),
        rewards={"total": torch.tensor(TOTAL_REWARD)}, advantages=torch.tensor(ADVANTAGES),
    )


PLANNER = {"planner_head": {"inner_size": 16, "use_confidence": True, "init_bias": 0.0}, "planner_lr": 1e-3}
# the loss knobs of each shipped profile (the optimizer knobs are the test's: lr 1e-3, no warmup, clipping on)
PROFILES = {
    "lightningrl": {},
    "grpo_traj": {"nll_weight": 0.0},
    "lightningrl_released": {"estimator": "single_pass", "reset_optimizer_each_step": True,
                             "nll_correct": "reward_nonneg"},
    "dultra_separate": {**PLANNER, "nll_weight": 1.0, "planner_ratio": "separate"},
    "dultra_joint": {**PLANNER, "nll_weight": 1.0, "planner_ratio": "joint"},
    "planner_only": {**PLANNER, "freeze_backbone": True},
    "masked_states": {"estimator": "masked_states"},
}


LOSS_KEYS = ("eps_low", "eps_high", "kl_beta", "kl_estimator", "nll_weight", "nll_correct", "policy_reduction",
             "kl_reduction", "nll_reduction", "tis_cap")


def _loss_kwargs(kw: dict) -> dict:
    """Profile knobs as `LightningRLModule` takes them: the loss knobs as one group (``model.init_args.loss``)."""
    from lrl.algorithms.losses import LossConfig

    loss = {k: kw.pop(k) for k in LOSS_KEYS if k in kw}
    return {**kw, "loss": LossConfig(**loss)}


def _one_step(checkpoint, profile: str) -> dict[str, float]:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lrl.module import LightningRLModule

    kw = _loss_kwargs(dict(PROFILES[profile]))
    module = LightningRLModule(str(checkpoint), block_size=BLOCK, lr=LR, warmup_steps=0, max_grad_norm=1.0,
                               ppo_epochs=EPOCHS, minibatches=2, micro_batch_size=1, rows_per_forward=1, max_copies=2,
                               max_rl_steps=1, **kw)
    torch.manual_seed(0)  # the fresh planner head's initialisation
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    batch = _batch(planner="planner_head" in PROFILES[profile])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda x: x))
    keys = ("loss/policy", "loss/kl", "loss/nll", "loss/planner", "train/grad_norm", "entropy", "clip/ratio_mean",
            "clip/low", "clip/high", "kl", "train/optimizer_steps")
    out = {k: float(trainer.logged_metrics[k]) for k in keys if k in trainer.logged_metrics}
    lm = module.policy
    # the first 4 entries of a row of these weights after the step
    out["lm_head[3]"] = [float(x) for x in lm.model.lm_head.weight[3, :4].detach()]
    out["q_proj[0]"] = [float(x) for x in lm.model.model.layers[0].self_attn.q_proj.weight[0, :4].detach()]
    if lm.planner is not None:
        first = next(p for p in lm.planner.parameters() if p.dim() == 2)
        out["planner[0]"] = [float(x) for x in first[0, :4].detach()]
    return out


# Recorded from main's code at 6db9831 (`python tests/test_rl_step_pinned.py` prints this dict).
EXPECTED: dict[str, dict] = {
    "dultra_joint": {
        "loss/policy": -0.25084006786346436,
        "loss/kl": 0.00564251933246851,
        "loss/nll": 6.260860443115234,
        "train/grad_norm": 14.94191837310791,
        "entropy": 0.0,
        "clip/ratio_mean": 3.1368842124938965,
        "clip/low": 0.1666666716337204,
        "clip/high": 0.2666666805744171,
        "kl": 0.5347179770469666,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [-0.02572031132876873, 0.023138264194130898, 0.011007635854184628, 0.03231540694832802],
        "q_proj[0]": [-0.02599915862083435, -0.0020742204505950212, -0.011844068765640259, 0.007885044440627098],
        "planner[0]": [-0.0024644106160849333, 0.04874963313341141, -0.0709722712635994, -0.06310000270605087],
    },
    "dultra_separate": {
        "loss/policy": -0.25225701928138733,
        "loss/kl": 0.002094619907438755,
        "loss/nll": 4.30417013168335,
        "loss/planner": -0.12483091652393341,
        "train/grad_norm": 10.451597213745117,
        "entropy": 4.567316055297852,
        "clip/ratio_mean": 1.7867118120193481,
        "clip/low": 0.13636364042758942,
        "clip/high": 0.25,
        "kl": 0.2094619870185852,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [-0.026731256395578384, 0.028223786503076553, 0.01055598258972168, 0.0321006216108799],
        "q_proj[0]": [-0.018161799758672714, -0.003523937426507473, -7.400050526484847e-05, 0.021075917407870293],
        "planner[0]": [-0.00295148859731853, 0.04684216529130936, -0.0730513408780098, -0.06485085934400558],
    },
    "grpo_traj": {
        "loss/policy": -0.23732993006706238,
        "loss/kl": 0.000986281898804009,
        "loss/nll": -0.0,
        "train/grad_norm": 3.826016426086426,
        "entropy": 4.577956676483154,
        "clip/ratio_mean": 1.3548650741577148,
        "clip/low": 0.04545454680919647,
        "clip/high": 0.1818181872367859,
        "kl": 0.09862819314002991,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [0.014874055050313473, 0.040179912000894547, 0.0035700625739991665, 0.02286098152399063],
        "q_proj[0]": [-0.01427021250128746, 0.02469830960035324, 0.008768093772232533, -0.0018452834337949753],
    },
    "lightningrl": {
        "loss/policy": -0.2366115301847458,
        "loss/kl": 0.0017169342609122396,
        "loss/nll": 0.4346216917037964,
        "train/grad_norm": 4.186155319213867,
        "entropy": 4.575692176818848,
        "clip/ratio_mean": 1.6944159269332886,
        "clip/low": 0.04545454680919647,
        "clip/high": 0.22727273404598236,
        "kl": 0.17169342935085297,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [0.004448937717825174, 0.04038149118423462, 0.007815477438271046, 0.027686480432748795],
        "q_proj[0]": [-0.015219315886497498, 0.01473403349518776, 0.010456756688654423, -0.00152579415589571],
    },
    "lightningrl_released": {
        "loss/policy": -0.2814001441001892,
        "loss/kl": 0.002307531191036105,
        "loss/nll": 0.4178282618522644,
        "train/grad_norm": 3.4926609992980957,
        "entropy": 4.584092617034912,
        "clip/ratio_mean": 1.670127511024475,
        "clip/low": 0.13636364042758942,
        "clip/high": 0.3181818127632141,
        "kl": 0.2307531237602234,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [-0.025753330439329147, 0.03335501626133919, 5.757063627243042e-05, 0.03032328560948372],
        "q_proj[0]": [-0.026468930765986443, 0.031165238469839096, 0.0007693379884585738, 0.010390274226665497],
    },
    "masked_states": {
        "loss/policy": -0.24785281717777252,
        "loss/kl": 0.0018597868038341403,
        "loss/nll": 0.4297586977481842,
        "train/grad_norm": 4.013275623321533,
        "entropy": 4.583785533905029,
        "clip/ratio_mean": 1.7155041694641113,
        "clip/low": 0.13636364042758942,
        "clip/high": 0.22727273404598236,
        "kl": 0.1859786957502365,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [-0.020873283967375755, 0.03587719053030014, 0.004125179257243872, 0.02997344359755516],
        "q_proj[0]": [-0.034249112010002136, 0.03298379108309746, 0.009833135642111301, -0.002656722441315651],
    },
    "planner_only": {
        "loss/policy": -0.25,
        "loss/kl": 0.0,
        "loss/nll": 0.4720499515533447,
        "loss/planner": -0.12311111390590668,
        "train/grad_norm": 0.1057087630033493,
        "entropy": 4.591822147369385,
        "clip/ratio_mean": 1.0,
        "clip/low": 0.0,
        "clip/high": 0.0,
        "kl": 0.0,
        "train/optimizer_steps": 4.0,
        "lm_head[3]": [-0.016027016565203667, 0.029772795736789703, -0.028379620984196663, 0.01829993538558483],
        "q_proj[0]": [-0.006991022266447544, -0.004627111367881298, -0.016951611265540123, 0.03213592618703842],
        "planner[0]": [-0.0010586701100692153, 0.04950542747974396, -0.07282424718141556, -0.06727628409862518],
    },
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_one_rl_step_reproduces_the_recorded_numbers(profile, tiny_checkpoint):
    got = _one_step(tiny_checkpoint, profile)
    want = EXPECTED[profile]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_the_pinned_profiles_differ_from_each_other(tiny_checkpoint):
    """Each profile's knobs change the step: the pins are not all one number (checked on the recorded values)."""
    losses = {p: (v["loss/policy"], v["loss/kl"], v["loss/nll"], v["train/grad_norm"]) for p, v in EXPECTED.items()}
    assert len(set(losses.values())) == len(losses)
    assert EXPECTED["grpo_traj"]["loss/nll"] == 0.0 and EXPECTED["lightningrl"]["loss/nll"] > 0
    assert EXPECTED["planner_only"]["lm_head[3]"] != EXPECTED["lightningrl"]["lm_head[3]"]
    assert EXPECTED["lightningrl"]["clip/high"] > 0 and EXPECTED["lightningrl"]["clip/low"] > 0  # the clip binds
    assert EXPECTED["planner_only"]["kl"] == 0.0  # frozen backbone: the policy stays the reference


if __name__ == "__main__":  # print the numbers of the code as it is now
    import pprint
    import tempfile
    from pathlib import Path

    from lrl.models import build_char_tokenizer, build_tiny_model, save_checkpoint

    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    path = Path(tempfile.mkdtemp()) / "tiny"
    save_checkpoint(build_tiny_model(tok, block_size=4, seed=0), path, tokenizer=tok)
    pprint.pprint({p: _one_step(path, p) for p in sorted(PROFILES)}, width=120, sort_dicts=False)
