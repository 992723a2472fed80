"""Reward terms a user adds (docs/rewards.md): a `RewardTerm` subclass or a function, by class path from the config;
shaped per group and summed with the others, numbers by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrl.rollout.types import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]


def _batch():
    # one group of 4: lengths 2, 4, 6, 8 (one forward each), responses 0 and 2 right; ground truth "42"
    lengths, texts = [2, 4, 6, 8], ["42", "x", "the 42", "y"]
    b = RolloutBatch(prompt_ids=[[1]] * 4, response_ids=[[5] * k for k in lengths], texts=texts,
                     step_maps=[[1] * k for k in lengths], num_forwards=torch.ones(4, dtype=torch.long),
                     num_store_passes=torch.zeros(4, dtype=torch.long), finish_reasons=["stop"] * 4,
                     group_index=torch.zeros(4, dtype=torch.long))
    b.prompts, b.ground_truths = ["q"], ["42"]
    b.accuracy = torch.tensor([1.0, 0.0, 1.0, 0.0])
    return b


def test_a_users_term_and_function_shape_and_sum_like_the_shipped_ones():
    from reward_examples import ShortAnswers

    from lrl.rewards.terms import Accuracy, Function, shape_terms

    terms = [Accuracy(), ShortAnswers(weight=0.5), Function("reward_examples.mentions_answer", name="mentions",
                                                            normalize="none", weight=2.0)]
    out = shape_terms(terms, _batch())
    assert list(out) == ["acc_raw", "short_raw", "mentions_raw", "acc", "short", "mentions", "total"]
    # short: −(2, 4, 6, 8)/100 → z-scored: mean −0.05, population std √5/100 → (3, 1, −1, −3)/√5, times 0.5
    z = torch.tensor([3.0, 1.0, -1.0, -3.0]) / 5 ** 0.5
    torch.testing.assert_close(out["short"], 0.5 * z)
    torch.testing.assert_close(out["mentions"], torch.tensor([2.0, 0.0, 2.0, 0.0]))
    torch.testing.assert_close(out["total"], torch.tensor([1.0, -1.0, 1.0, -1.0]) + 0.5 * z +
                               torch.tensor([2.0, 0.0, 2.0, 0.0]))


def test_terms_come_from_the_config_by_class_path(tiny_checkpoint, tmp_path, monkeypatch):
    from lrl.cli import cli_main

    monkeypatch.chdir(tmp_path)
    cli = cli_main(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--checkpoint", str(tiny_checkpoint),
                    "--trainer.logger=false",
                    "--data.init_args.rewards+={class_path: reward_examples.ShortAnswers, init_args: {weight: 0.5}}"],
                   run=False)
    terms = cli.datamodule.reward_terms
    assert [(t.name, t.weight, t.normalize) for t in terms] == [("acc", 1.0, "pm1"), ("tpf", 1.0, "z_score"),
                                                                ("short", 0.5, "z_score")]


def test_bad_terms_are_refused_naming_the_key():
    from reward_examples import ShortAnswers

    from lrl.rewards.terms import TPF, Function, check_terms

    with pytest.raises(ValueError, match="data.init_args.rewards: two terms named 'tpf'"):
        check_terms([TPF(), TPF()])
    check_terms([TPF(), TPF(name="tpf_minmax", normalize="minmax")])
    with pytest.raises(ValueError, match="data.init_args.rewards is empty"):
        check_terms([])
    with pytest.raises(ValueError, match=r"Function.function='no_such_module.f' does not import"):
        Function("no_such_module.f", name="f")
    with pytest.raises(ValueError, match="needs a name other than 'total'"):
        ShortAnswers(name="total")
