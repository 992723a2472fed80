"""One RL step of each shipped loss family, pinned to the numbers of the code before issue 31's refactor.

`LightningRLModule.training_step` (the real Lightning loop, optimizer, scheduler and logging) runs once on a
hand-built `RolloutBatch` of the tiny model, with the loss knobs of configs/lightningrl.yaml, grpo_traj.yaml,
lightningrl_released.yaml, dultra.yaml (planner ``separate`` and ``joint``), configs/algorithm/masked_states.yaml
and planner_only.yaml. The logged loss terms, the gradient norm and a few parameters after the step were recorded
from main's code at 6db9831 (before the loss knobs became one group and ``training_step`` was split); the refactor
must reproduce them. Two minibatches, so the old-log-prob pass and a second optimizer step (whose loss depends on
the first step's update) run; the KL against the frozen reference is on (β > 0) where the profile has it.
"""

from __future__ import annotations

import pytest
import torch

from lrl.rollout.types import RolloutBatch, SamplingParams

BLOCK = 4
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


def _loss_kwargs(kw: dict) -> dict:
    """Profile knobs as `LightningRLModule` takes them."""
    return dict(kw)


def _one_step(checkpoint, profile: str) -> dict[str, float]:
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lrl.module import LightningRLModule

    kw = _loss_kwargs(dict(PROFILES[profile]))
    module = LightningRLModule(str(checkpoint), block_size=BLOCK, lr=1e-3, warmup_steps=0, max_grad_norm=1.0,
                               minibatches=2, micro_batch_size=1, rows_per_forward=1, max_copies=2, max_rl_steps=1,
                               **kw)
    torch.manual_seed(0)  # the fresh planner head's initialisation
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0)
    batch = _batch(planner="planner_head" in PROFILES[profile])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda x: x))
    keys = ("loss/policy", "loss/kl", "loss/nll", "loss/planner", "train/grad_norm", "entropy", "clip/ratio_mean",
            "kl", "train/optimizer_steps")
    out = {k: float(trainer.logged_metrics[k]) for k in keys if k in trainer.logged_metrics}
    lm = module.policy
    out["lm_head[3]"] = [float(x) for x in lm.model.lm_head.weight[3, :4]]
    out["q_proj[0]"] = [float(x) for x in lm.model.model.layers[0].self_attn.q_proj.weight[0, :4]]
    if lm.planner is not None:
        first = next(p for p in lm.planner.parameters() if p.dim() == 2)
        out["planner[0]"] = [float(x) for x in first[0, :4]]
    return out


# Recorded from main's code at 6db9831 (`python tests/test_rl_step_pinned.py` prints this dict).
EXPECTED: dict[str, dict] = {
    "dultra_joint": {
        "loss/policy": -0.23532310128211975,
        "loss/kl": 0.0001884415396489203,
        "loss/nll": 6.824502944946289,
        "train/grad_norm": 23.454952239990234,
        "entropy": 0.0,
        "clip/ratio_mean": 0.9789351224899292,
        "kl": 0.017587875947356224,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.016323501244187355, 0.02778320014476776, -0.026459962129592896, 0.017963659018278122],
        "q_proj[0]": [-0.007471790071576834, -0.004257282707840204, -0.015115378424525261, 0.03180351108312607],
        "planner[0]": [-0.0013986846897751093, 0.047971077263355255, -0.07173745334148407, -0.0655360221862793],
    },
    "dultra_separate": {
        "loss/policy": -0.2544775605201721,
        "loss/kl": 2.001483335334342e-05,
        "loss/nll": 4.707586288452148,
        "loss/planner": -0.12126927077770233,
        "train/grad_norm": 16.259315490722656,
        "entropy": 4.589550971984863,
        "clip/ratio_mean": 1.0118093490600586,
        "kl": 0.0020014832261949778,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.016317827627062798, 0.027774758636951447, -0.02641967125236988, 0.01794726401567459],
        "q_proj[0]": [-0.007467258721590042, -0.004265116062015295, -0.015116611495614052, 0.03180800750851631],
        "planner[0]": [-0.0013862049672752619, 0.04796769097447395, -0.07320024073123932, -0.06553027778863907],
    },
    "grpo_traj": {
        "loss/policy": -0.25686419010162354,
        "loss/kl": 3.965765063185245e-05,
        "loss/nll": -0.0,
        "train/grad_norm": 5.635112762451172,
        "entropy": 4.58754301071167,
        "clip/ratio_mean": 1.0119210481643677,
        "kl": 0.0039657652378082275,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.014247409068048, 0.029273241758346558, -0.026935381814837456, 0.01759464293718338],
        "q_proj[0]": [-0.007529986556619406, -0.004284113645553589, -0.015113518573343754, 0.0318259634077549],
    },
    "lightningrl": {
        "loss/policy": -0.25598639249801636,
        "loss/kl": 3.259363438701257e-05,
        "loss/nll": 0.4707845151424408,
        "train/grad_norm": 6.731590270996094,
        "entropy": 4.587896823883057,
        "clip/ratio_mean": 1.0107747316360474,
        "kl": 0.0032593635842204094,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.014262118376791477, 0.028563130646944046, -0.02663366124033928, 0.017757413908839226],
        "q_proj[0]": [-0.007515664678066969, -0.004266822710633278, -0.015096580609679222, 0.03182349354028702],
    },
    "lightningrl_released": {
        "loss/policy": -0.2549992799758911,
        "loss/kl": 2.2149681171867996e-05,
        "loss/nll": 0.4706912338733673,
        "train/grad_norm": 6.752432823181152,
        "entropy": 4.589038848876953,
        "clip/ratio_mean": 1.0061551332473755,
        "kl": 0.002214968204498291,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.016679320484399796, 0.028756873682141304, -0.026698248460888863, 0.01787676475942135],
        "q_proj[0]": [-0.008229101076722145, -0.002648189663887024, -0.015777988359332085, 0.031030774116516113],
    },
    "masked_states": {
        "loss/policy": -0.25385037064552307,
        "loss/kl": 1.5839501429582015e-05,
        "loss/nll": 0.4706437587738037,
        "train/grad_norm": 6.494657516479492,
        "entropy": 4.589172840118408,
        "clip/ratio_mean": 1.0068351030349731,
        "kl": 0.0015839501284062862,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.016390787437558174, 0.028087446466088295, -0.02679881453514099, 0.017774220556020737],
        "q_proj[0]": [-0.007820382714271545, -0.004043778870254755, -0.014959507621824741, 0.03143436461687088],
    },
    "planner_only": {
        "loss/policy": -0.25,
        "loss/kl": 0.0,
        "loss/nll": 0.4720499515533447,
        "loss/planner": -0.12126095592975616,
        "train/grad_norm": 0.12055444717407227,
        "entropy": 4.591822147369385,
        "clip/ratio_mean": 1.0,
        "kl": 0.0,
        "train/optimizer_steps": 2.0,
        "lm_head[3]": [-0.016027016565203667, 0.029772795736789703, -0.028379620984196663, 0.01829993538558483],
        "q_proj[0]": [-0.006991022266447544, -0.004627111367881298, -0.016951611265540123, 0.03213592618703842],
        "planner[0]": [-0.0014021587558090687, 0.047974105924367905, -0.07320838421583176, -0.06553898751735687],
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
