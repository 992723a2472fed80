"""Answer styles of the synthetic task (issue #12): every style is a correct answer, the classifier recognises it,
mixing follows the weights, the single-style task is unchanged, and the rollout diagnostics on a hand-built batch."""

from __future__ import annotations

import re

import pytest
import torch

from lrl.metrics.diagnostics import rollout_diagnostics
from lrl.tasks import SyntheticArithmetic, get_task
from lrl.tasks.answer_styles import LAYOUT_STYLES, classify_style, render_answer

ALL = {"chain": 1.0, "padded": 1.0, "spaced": 1.0, "ans": 1.0}


@pytest.fixture(scope="module")
def mixed() -> SyntheticArithmetic:
    return SyntheticArithmetic(num_train=2000, num_eval=200, styles=ALL)


def _reference_steps(text: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """Slow reference parse of any style: whitespace dropped, numbers read as integers, ``ans`` read as the
    previous step's result."""
    body, box = text.rsplit("\\boxed{", 1)
    ops = []
    for a, s, b, c in re.findall(r"(\d+|ans)([+*-])(\d+)=(\d+)\.", body.replace(" ", "")):
        ops.append((ops[-1][3] if a == "ans" else int(a), s, int(b), int(c)))
    return ops, int(box.rstrip("}"))


def test_every_style_of_every_problem_is_correct_and_recognised(mixed: SyntheticArithmetic) -> None:
    records = mixed.load("train")[:150] + mixed.load("eval")[:50]
    texts, per_row = [], []
    for r in records:
        for style in LAYOUT_STYLES:
            text = render_answer(style, r["ops"], r["result"])
            assert classify_style(text) == style, (style, text)
            ops, boxed = _reference_steps(text)
            assert [list(op) for op in ops] == r["ops"] and boxed == r["result"]
            previous = None
            for a, s, b, c in ops:  # the arithmetic holds and every step uses the previous result
                assert {"+": a + b, "-": a - b, "*": a * b}[s] == c
                assert previous is None or a == previous
                previous = c
            texts.append(text)
            per_row.append(r)
    assert mixed.score(texts, per_row) == [1.0] * len(texts)  # the real math verifier


def test_sums_every_style_is_correct_recognised_and_has_the_dependencies_it_claims() -> None:
    task = SyntheticArithmetic(num_train=600, num_eval=100, family="sums", styles={"chain": 0.5, "pairs": 0.5})
    records = task.load("train")[:150] + task.load("eval")[:50]
    texts, per_row = [], []
    for r in records:
        q = [int(v) for v in re.findall(r"\d+", r["question"])]
        assert len(q) == 4 and sum(q) == r["result"] <= 99 and all(2 <= v <= 24 for v in q)
        assert r["question"].endswith("How many in all?") and 40 <= len(r["question"]) <= 90
        for style in ("chain", "pairs"):
            text = render_answer(style, r["ops"], r["result"])
            assert classify_style(text) == style, (style, text)
            ops, boxed = _reference_steps(text)
            assert boxed == r["result"] and all(a + b == c and s == "+" for a, s, b, c in ops)
            if style == "chain":  # a running total over the amounts in order
                assert [op[2] for op in ops] == q[1:] and ops[0][0] == q[0]
            else:  # two partial sums of the question's amounts, then their total
                assert ops[0][:3:2] == tuple(q[:2]) and ops[1][:3:2] == tuple(q[2:])
                assert ops[2][:3:2] == (ops[0][3], ops[1][3])
            assert 20 <= len(text) <= 40
            texts.append(text)
            per_row.append(r)
    assert task.score(texts, per_row) == [1.0] * len(texts)
    assert {r["style"] for r in records} == {"chain", "pairs"}
    assert task.style_names == ("chain", "pairs", "other")
    # the chains family is untouched by the new argument
    assert SyntheticArithmetic(family="chains").load("train") == SyntheticArithmetic().load("train")


def test_pairs_by_hand() -> None:
    ops = [[12, "+", 7, 19], [19, "+", 5, 24], [24, "+", 9, 33]]
    assert render_answer("pairs", ops, 33) == "12+7=19. 5+9=14. 19+14=33. \\boxed{33}"
    assert classify_style("12+7=19. 19+5=24. 24+9=33. \\boxed{33}") == "chain"
    # a third step that does not add the two partial sums, or a second that continues the first: not pairs
    assert classify_style("12+7=19. 5+9=14. 14+19=33. \\boxed{33}") == "chain"
    assert classify_style("12+7=19. 19+9=28. 19+28=47. \\boxed{47}") == "chain"
    with pytest.raises(ValueError, match="style 'pairs' needs a sum of four numbers"):
        render_answer("pairs", [[9, "*", 9, 81], [81, "+", 5, 86]], 86)
    with pytest.raises(ValueError, match="style 'pairs' needs family: sums"):
        SyntheticArithmetic(styles={"chain": 0.5, "pairs": 0.5})
    with pytest.raises(ValueError, match="unknown family 'products'"):
        SyntheticArithmetic(family="products")


def test_style_layouts_by_hand() -> None:
    ops = [[9, "*", 9, 81], [81, "+", 5, 86]]
    assert render_answer("chain", ops, 86) == "9*9=81. 81+5=86. \\boxed{86}"
    assert render_answer("padded", ops, 86) == "09*09=81. 81+05=86. \\boxed{86}"
    assert render_answer("spaced", ops, 86) == "9 * 9 = 81. 81 + 5 = 86. \\boxed{86}"
    assert render_answer("ans", ops, 86) == "9*9=81. ans+5=86. \\boxed{86}"
    assert classify_style("9*9=81. ans+5=86. \\boxed{86}") == "ans"
    assert classify_style("  09*09=81. 81+05=86. \\boxed{86}\n") == "padded"
    assert classify_style("12+15=27. \\boxed{27}") == "chain"  # no one-digit number: reads as chain
    for other in ("09*9=81. \\boxed{81}", "9*9=81. 81 + 5 = 86. \\boxed{86}", "9*9=81.", "", "\\boxed{3}",
                  "9*9=081. \\boxed{81}", "ans+5=86. \\boxed{86}", "9*9=81. ans+05=86. \\boxed{86}"):
        assert classify_style(other) == "other", other
    with pytest.raises(ValueError, match="unknown answer style 'fancy'"):
        render_answer("fancy", ops, 86)


def test_mixing_follows_the_weights() -> None:
    task = SyntheticArithmetic(num_train=4000, num_eval=10, styles={"chain": 0.7, "padded": 0.3})
    records = task.load("train")
    share = sum(r["style"] == "padded" for r in records) / len(records)
    assert abs(share - 0.3) < 4 * (0.21 / len(records)) ** 0.5  # ±4σ of a binomial
    for r in records[:200]:
        assert classify_style(task.target_response(r)) == r["style"]
        assert any(v < 10 for op in r["ops"] for v in (op[0], op[2], op[3]))  # padded differs from chain
    assert task.style_names == ("chain", "padded", "other")
    only_padded = SyntheticArithmetic(num_train=20, num_eval=5, styles={"padded": 1.0})
    assert all(r["style"] == "padded" for r in only_padded.load("train"))


def test_single_style_task_is_unchanged() -> None:
    task = get_task("synthetic")
    first = task.load("train")[0]
    # pinned from the task before styles existed: same problems, same targets
    assert first["answer"] == "9*8=72. 72-13=59. 59+18=77. #### 77"
    assert task.target_response(first) == "9*8=72. 72-13=59. 59+18=77. \\boxed{77}"
    assert task.load("train") == SyntheticArithmetic(styles={"chain": 1.0}).load("train")


@pytest.mark.parametrize(
    ("styles", "match"),
    [({"fancy": 1.0}, "unknown styles"), ({"chain": -1.0, "padded": 1.0}, "weights must be >= 0"),
     ({"chain": 0.0}, "positive sum")],
)
def test_bad_styles_are_refused(styles, match) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticArithmetic(styles=styles)


def test_rollout_diagnostics_by_hand() -> None:
    texts = ["a", "a", "b", "c", "c", "c"]
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    tpf = torch.tensor([2.0, 4.0, 6.0, 3.0, 3.0, 3.0])
    forwards = torch.tensor([5, 3, 2, 4, 4, 4])
    lengths = torch.tensor([10, 12, 12, 12, 12, 12])
    styles = ["chain", "chain", "padded", "chain", "chain", "chain"]
    d = rollout_diagnostics(texts, tpf, forwards, lengths, group, styles, ("chain", "padded", "spaced", "other"))
    assert d["rollout/distinct_texts_per_group"] == pytest.approx((2 + 1) / 2)
    assert d["rollout/identical_groups"] == pytest.approx(0.5)
    # group 0: population std of (2, 4, 6) = sqrt(8/3); group 1: 0
    assert d["rollout/tpf_std_in_group"] == pytest.approx((8 / 3) ** 0.5 / 2)
    assert d["rollout/forwards_per_response"] == pytest.approx(22 / 6)
    assert d["rollout/tokens_per_response"] == pytest.approx(70 / 6)
    assert d["style/chain"] == pytest.approx(5 / 6) and d["style/padded"] == pytest.approx(1 / 6)
    assert d["style/spaced"] == 0.0 and d["style/other"] == 0.0
    assert d["rollout/mixed_style_groups"] == pytest.approx(0.5)
    # group 0: total sum of squares around 4 is 4 + 0 + 4 = 8; the texts' means ("a": 3 twice, "b": 6 once) give
    # 2·1 + 1·4 = 6 between texts; group 1 is flat → 6 / 8. Among correct answers (the two "a") all is luck: 0.
    assert d["rollout/tpf_var_between_texts"] == pytest.approx(0.75)
    assert "rollout/tpf_var_between_texts_correct" not in d
    correct = torch.tensor([True, True, False, True, True, True])
    dc = rollout_diagnostics(texts, tpf, forwards, lengths, group, correct=correct)
    assert dc["rollout/tpf_var_between_texts_correct"] == pytest.approx(0.0)
    flat = rollout_diagnostics(texts, torch.full((6,), 3.0), forwards, lengths, group, correct=correct)
    assert "rollout/tpf_var_between_texts" not in flat and "rollout/tpf_var_between_texts_correct" not in flat
    with pytest.raises(ValueError, match="6 texts but 5 correctness flags"):
        rollout_diagnostics(texts, tpf, forwards, lengths, group, correct=correct[:5])
    assert "style/chain" not in rollout_diagnostics(texts, tpf, forwards, lengths, group)
    with pytest.raises(ValueError, match="6 texts but 5 tpf"):
        rollout_diagnostics(texts, tpf[:5], forwards, lengths, group)


def test_answer_roles_label_copies_results_and_layout():
    from lrl.tasks.answer_styles import answer_roles

    text = "09*09=81. 81+05=86. \\boxed{86}"
    # o: copied from the question, r: computed, c: copy of an earlier result, l: layout
    assert "".join(r[0] for r in answer_roles(text)) == "ooloolrrllccloolrrlllllllllccl"
    assert set(answer_roles("not an answer")) == {"layout"}
    # `ans` refers to the previous result without copying it: layout, not a carried copy
    assert "".join(r[0] for r in answer_roles("9*9=81. ans+5=86. \\boxed{86}")) == "ololrrllllllolrrlllllllllccl"


def test_other_kind_tells_mixed_layouts_from_malformed_text():
    from lrl.tasks.answer_styles import other_kind

    mixed = "9*9=81. 81+05=86. \\boxed{86}"  # chain numbers with one padded operand
    assert classify_style(mixed) == "other" and other_kind(mixed) == "mixed"
    for malformed in ("29*3=87. 87-2=85. \\boxed{85}}", "21+15=36. 36*2=722 \\boxed{72}", "6+9=15. 15-9=6. \\boxed{{6"):
        assert classify_style(malformed) == "other" and other_kind(malformed) == "malformed", malformed
    # a value that is 0 keeps its zero (no digit follows it)
    assert classify_style("2-2=0. 0+05=5. \\boxed{5}") == "other" and other_kind("2-2=0. 0+05=5. \\boxed{5}") == "mixed"
    # `ans` in some steps and copies in others: mixed; an `ans` in the first step names nothing: malformed
    steps_mixed = "9*9=81. ans+5=86. 86-6=80. \\boxed{80}"
    assert classify_style(steps_mixed) == "other" and other_kind(steps_mixed) == "mixed"
    assert other_kind("ans*9=81. ans+5=86. \\boxed{86}") == "malformed"


def test_forward_anatomy_counts_by_hand():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from forward_anatomy import anatomy

    # prompt of 2 tokens, blocks of 4: "2+" in block 0 (step 1), "3=5." in block 1 (steps 2, 2, 3, 2), the stop
    # token in block 2 (step 4). Forwards {1, 2, 3, 4}; steps 3 ("5", a result) and 4 (stop) unmask one token.
    text, steps = "2+3=5.", [1, 1, 2, 2, 3, 2, 4]
    res = anatomy([text, text, text], [steps, steps, [1] * 7], [2, 2, 2], 4, ["a", "a", "b"])
    a = res["a"]
    assert a["responses"] == 2 and a["forwards_per_response"] == 4
    assert a["single_token_forwards_per_response"] == 2
    assert a["single_token_forwards_by_role"] == {"operand": 0, "result": 1, "layout": 0, "stop": 1}
    assert a["mean_block_step_by_role"] == {"operand": 1.0, "result": 2.0, "layout": 1.0, "stop": 1.0}
    assert a["tokens_per_response_by_role"] == {"operand": 2.0, "result": 1.0, "layout": 3.0, "stop": 1.0}
    assert res["b"]["forwards_per_response"] == 1 and res["b"]["single_token_forwards_per_response"] == 0
    # one step (its result level 1, in block 1) over blocks 0, 1 and 2: the floor is one forward per block
    assert a["floor_forwards_per_response"] == 3 and res["b"]["floor_forwards_per_response"] == 3


def test_dependency_levels_and_forward_floor_by_hand():
    from lrl.tasks.answer_styles import dependency_levels, forward_floor

    text = "9*9=81. 81+5=86. \\boxed{86}"
    # 81 is computable from the question (level 1) and so is its copy; 86 needs 81 (level 2), and so does the box;
    # operands and layout need no computation (level 0)
    expected = [0] * 4 + [1, 1] + [0] * 2 + [1, 1] + [0] * 3 + [2, 2] + [0] * 9 + [2, 2] + [0]
    assert dependency_levels(text) == expected
    assert dependency_levels("09*09=81. 81+05=86. \\boxed{86}") == [0] * 6 + [1, 1] + [0] * 2 + [1, 1] + [0] * 4 + \
        [2, 2] + [0] * 9 + [2, 2] + [0]
    assert dependency_levels("not an answer") == [0] * 13
    # `ans` is layout (level 0): only the results and the boxed copy wait
    assert dependency_levels("9*9=81. ans+5=86. \\boxed{86}") == [0] * 4 + [1, 1] + [0] * 8 + [2, 2] + [0] * 9 + \
        [2, 2] + [0]
    # pairs: both partial sums from the question (level 1), their total level 2
    assert dependency_levels("12+7=19. 5+9=14. 19+14=33. \\boxed{33}") == [0] * 5 + [1, 1] + [0] * 6 + [1, 1] + \
        [0] * 2 + [1, 1, 0, 1, 1, 0, 2, 2] + [0] * 9 + [2, 2] + [0]
    # block 0 holds levels 1 and 2: two forwards; block 1 only needs level 2, already committed: one
    assert forward_floor(expected, 0, 16) == 3
    # prompt of 4, blocks of 8: [0..3] layout → 1, [4..11] level 1 → 1, [12..19] reaches 2 → 1, [20..26] → 1
    assert forward_floor(expected, 4, 8) == 4
    # three steps in one block: three forwards
    assert forward_floor([0, 1, 2, 3], 0, 16) == 3
    # prompt of 2, blocks of 4: levels 1, 2 in block 0 (two forwards), then the padding past the text (length 6)
    # fills block 1 at the top level 2 (one forward); without the padding, block 1 does not exist
    assert forward_floor([1, 2], 2, 4, length=6) == 3 and forward_floor([1, 2], 2, 4) == 2
    # a block of layout only commits no value: the level-1 result of the next block still costs its forward, and
    # the level-2 one a second
    assert forward_floor([0, 0, 1, 2], 0, 2) == 3
    # the same steps written as pairs (one dependent step fewer) in one block of 32: two forwards against three
    pairs = dependency_levels("12+7=19. 5+9=14. 19+14=33. \\boxed{33}")
    chain = dependency_levels("12+7=19. 19+5=24. 24+9=33. \\boxed{33}")
    assert forward_floor(pairs, 0, 64) == 2 and forward_floor(chain, 0, 64) == 3
    with pytest.raises(ValueError, match="block_size >= 1"):
        forward_floor([0], 0, 0)


def test_datamodule_diagnostics_renumber_refill_rounds_and_pass_verdicts() -> None:
    """Two refill rounds of one group each: the groups stay apart, and the verifier's verdicts reach the
    correct-only variance share (same numbers as `test_rollout_diagnostics_by_hand`)."""
    from lrl.pipeline import RLStep
    from lrl.rollout import RolloutBatch

    def batch(texts, lengths, forwards, correct):
        n = len(texts)
        return RolloutBatch(prompt_ids=[[0]] * n, response_ids=[[1] * k for k in lengths], texts=texts,
                            step_maps=[list(range(1, k + 1)) for k in lengths], num_forwards=torch.tensor(forwards),
                            num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
                            group_index=torch.zeros(n, dtype=torch.long), correct=torch.tensor(correct))

    rounds = [batch(["a", "a", "b"], [4, 4, 6], [2, 1, 1], [True, True, False]),  # TPF 2, 4, 6
              batch(["c", "c", "c"], [3, 3, 3], [1, 1, 1], [True, True, True])]  # TPF 3, 3, 3
    step, task = RLStep(), SyntheticArithmetic()
    d = step.diagnostics(rounds, task)
    assert d["rollout/distinct_texts_per_group"] == pytest.approx(1.5)  # 2 and 1, not 3 in one merged group
    assert d["rollout/tpf_var_between_texts"] == pytest.approx(0.75)
    assert d["rollout/tpf_var_between_texts_correct"] == pytest.approx(0.0)
    # a style outside the task's mix (here `padded` on the chain-only task) is logged from its first appearance
    # on, as 0 once it is gone, so no stale share is repeated
    padded, chain = "09*09=81. \\boxed{81}", "9*9=81. \\boxed{81}"
    d = step.diagnostics([batch([padded, chain, chain, chain], [4] * 4, [1] * 4, [True] * 4)], task)
    assert (d["style/chain"], d["style/padded"], d["style/other"]) == (0.75, 0.25, 0.0)
    d = step.diagnostics([batch([chain, chain], [4, 4], [1, 1], [True, True])], task)
    assert (d["style/chain"], d["style/padded"], d["style/other"]) == (1.0, 0.0, 0.0)


def test_group_anatomy_by_hand():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from group_anatomy import format_group_anatomy, group_anatomy

    # group 0 mixes styles: two samples of one chain text (TPF 4 and 2), a padded answer (TPF 6), a wrong answer
    # (TPF 4); group 1: four identical chain answers at TPF 3
    texts = ["c1", "c1", "p1", "x", "c2", "c2", "c2", "c2"]
    styles = ["chain", "chain", "padded", "other"] + ["chain"] * 4
    tpf = [4.0, 2.0, 6.0, 4.0] + [3.0] * 4
    forwards = [8, 16, 6, 8] + [10] * 4
    lengths = [32, 32, 36, 32] + [30] * 4
    correct = [True, True, True, False] + [True] * 4
    res = group_anatomy(texts, tpf, forwards, lengths, correct, styles, 4)
    assert res["per_style"]["chain"] == pytest.approx(
        {"samples": 6, "accuracy": 1.0, "tpf": 18 / 6, "forwards": 64 / 6, "tokens": 184 / 6})
    assert res["distinct_texts_per_group"] == 2.0 and res["mixed_style_groups"] == 1
    # group 0: TPF sum of squares around 4 is 8, of which 2 (the two "c1" around their mean 3) + 4 ("p1") between
    # texts; among the correct three (4, 2, 6) the same 6 of 8
    assert res["tpf_var_between_texts"] == pytest.approx(0.75)
    assert res["tpf_var_between_texts_correct"] == pytest.approx(0.75)
    # z(TPF) in group 0 (std √2): 0, −√2, +√2, 0
    assert res["z_tpf_in_mixed_groups"] == pytest.approx({"chain": -(2 ** 0.5) / 2, "padded": 2 ** 0.5, "other": 0.0})
    # −forwards −8, −16, −6, −8: mean −9.5, std √14.75
    s = 14.75 ** 0.5
    assert res["z_neg_forwards_in_mixed_groups"] == pytest.approx(
        {"chain": (1.5 - 6.5) / 2 / s, "padded": 3.5 / s, "other": 1.5 / s})
    # correct padded (6, 6, 36) against the correct chain answers' means (3, 12, 32)
    assert res["paired_vs_reference"] == {"padded": pytest.approx({"groups": 1, "tpf": 3.0, "forwards": -6.0,
                                                                   "tokens": 4.0})}
    # totals 1, 1 − √2, 1 + √2, −1: a right answer on top
    assert res["groups_right_and_wrong"] == 1 and res["groups_where_a_wrong_answer_tops_the_reward"] == 0
    assert res["tpf_correct"] == pytest.approx((4 + 2 + 6 + 12) / 7) and res["tpf_wrong"] == 4.0
    assert "| padded | 1 | 100.0 | 6.00 | 6.00 | 36.0 | +1.41 |" in format_group_anatomy(res)
    # a fast wrong answer: z = −3/7 for the three right ones (totals 4/7), +13/7 for the wrong one (6/7)
    fast_wrong = group_anatomy(["a", "a", "a", "b"], [2.0, 2.0, 2.0, 10.0], [9, 9, 9, 2], [18, 18, 18, 20],
                               [True, True, True, False], ["chain"] * 3 + ["other"], 4)
    assert fast_wrong["groups_where_a_wrong_answer_tops_the_reward"] == 1
    with pytest.raises(ValueError, match="divisible by group_size=3"):
        group_anatomy(texts, tpf, forwards, lengths, correct, styles, 3)


def test_worked_steps_hold_for_every_style_and_not_for_garbled_work(mixed: SyntheticArithmetic) -> None:
    from lrl.tasks.answer_styles import worked_steps_hold

    sums = SyntheticArithmetic(num_train=300, num_eval=50, family="sums", styles={"chain": 0.5, "pairs": 0.5})
    for task, styles in ((mixed, LAYOUT_STYLES), (sums, ("chain", "pairs"))):
        for r in task.load("train")[:100]:
            for style in styles:
                assert task.worked_steps_hold(render_answer(style, r["ops"], r["result"])), (style, r["ops"])
    # garbled work under a right box (42 = 14+15+3+10), each broken in one way
    assert worked_steps_hold(" 14+15=29. 3+10=13. 29+13=42. \\boxed{42}\n")
    assert not worked_steps_hold("14+15=29. 29+3=33. 33+9=42. \\boxed{42}")  # 29+3 is not 33
    assert not worked_steps_hold("14+15=29. 30+3=33. 33+9=42. \\boxed{42}")  # carries 30, the result was 29
    assert not worked_steps_hold("14+15=29. 3+10=13. 29+13=42. \\boxed{41}")  # box is not the last result
    assert not worked_steps_hold("14+15=29. 3+10=13. 2+13=15. 15+27=42. \\boxed{42}")  # continues a wrong result
    assert not worked_steps_hold("14+15=29. 3+10=13.. 29+13=42. \\boxed{42}")  # no style's layout
    assert not worked_steps_hold("\\boxed{42}")  # no steps at all
    assert worked_steps_hold("9*9=81. ans+5=86. \\boxed{86}") and not worked_steps_hold("9*9=81. ans+5=87. \\boxed{87}")
    assert worked_steps_hold("09*09=81. 81-05=76. \\boxed{76}")


def test_require_worked_steps_gates_the_accuracy_reward_not_the_verifier() -> None:

    from lrl.pipeline import RLStep
    from lrl.rewards.terms import TPF, Accuracy
    from lrl.rollout import RolloutBatch

    task = SyntheticArithmetic(num_train=10, num_eval=5, family="sums", styles={"chain": 0.5, "pairs": 0.5})
    record = {"question": "Liz has 14 cards. Ben has 15. Max has 3. Mia has 10. How many in all?",
              "answer": "14+15=29. 29+3=32. 32+10=42. #### 42"}
    texts = ["14+15=29. 29+3=32. 32+10=42. \\boxed{42}",  # chain, right
             "14+15=29. 3+10=13. 29+13=42. \\boxed{42}",  # pairs, right
             "14+15=29. 3+10=13. 29+12=42. \\boxed{42}",  # right box over a wrong step
             "14+15=29. 29+3=32. 32+10=42. \\boxed{43}"]  # wrong box
    n = len(texts)

    def scored(require: bool) -> RolloutBatch:
        batch = RolloutBatch(prompt_ids=[[0]] * n, response_ids=[[1] * 8] * n, texts=texts,
                             step_maps=[list(range(1, 9))] * n, num_forwards=torch.full((n,), 4),
                             num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
                             group_index=torch.zeros(n, dtype=torch.long))
        step = RLStep(rewards=[Accuracy(), TPF(weight=0.0, normalize="none")], require_worked_steps=require)
        step.score(batch, [record], task)
        return batch

    assert task.score(texts, [record] * n) == [1.0, 1.0, 1.0, 0.0]  # the verifier reads the box only
    off, on = scored(False), scored(True)
    assert off.correct.tolist() == [True, True, True, False] and off.rewards["acc"].tolist() == [1, 1, 1, -1]
    assert on.correct.tolist() == [True, True, False, False] and on.rewards["acc"].tolist() == [1, 1, -1, -1]
    assert on.stats["right_answers_bad_steps"] == off.stats["right_answers_bad_steps"] == 1.0


def test_require_worked_steps_needs_a_task_that_checks_them(tiny_checkpoint) -> None:
    from datamodules.rollout import RolloutDataModule

    dm = RolloutDataModule(checkpoint=str(tiny_checkpoint), task="gsm8k", require_worked_steps=True)
    with pytest.raises(ValueError, match="data.require_worked_steps=true but task 'gsm8k' has no check"):
        dm.setup("fit")


def test_sound_accuracy_counts_right_answers_over_steps_that_hold() -> None:
    from lrl.evaluation.pareto import sound_accuracy
    from lrl.tasks import get_task

    task = SyntheticArithmetic(num_train=10, num_eval=5, family="sums", styles={"chain": 0.5, "pairs": 0.5})
    texts = ["14+15=29. 3+10=13. 29+13=42. \\boxed{42}", "14+15=29. 3+10=13. 29+12=42. \\boxed{42}",
             "14+15=29. 3+10=13. 29+13=42. \\boxed{42}", "garbled \\boxed{42}"]
    # right, right over a wrong step, verifier says wrong (say another question), right without steps
    assert sound_accuracy(task, texts, [1.0, 1.0, 0.0, 1.0]) == 25.0
    assert sound_accuracy(get_task("gsm8k"), texts, [1.0] * 4) is None  # a task without the check


def test_style_breakdown_by_hand() -> None:
    from lrl.evaluation.pareto import style_breakdown
    from lrl.rollout import RolloutBatch

    task = SyntheticArithmetic(num_train=10, num_eval=5, family="sums", styles={"chain": 0.5, "pairs": 0.5})
    texts = ["14+15=29. 29+3=32. 32+10=42. \\boxed{42}",  # chain, right, sound
             "14+15=29. 29+3=33. 33+9=42. \\boxed{42}",  # chain, right box over a wrong step
             "14+15=29. 3+10=13. 29+13=42. \\boxed{42}",  # pairs, right, sound
             "14+15=29. 3+10=13. 29+13=42. \\boxed{42}",  # pairs, scored wrong (another question, say)
             "42"]  # other
    lengths = [40, 40, 40, 40, 2]
    batch = RolloutBatch(prompt_ids=[[0]] * 5, response_ids=[[1] * k for k in lengths], texts=texts,
                         step_maps=[list(range(1, k + 1)) for k in lengths],
                         num_forwards=torch.tensor([12, 10, 8, 12, 1]),
                         num_store_passes=torch.zeros(5, dtype=torch.long), finish_reasons=["stop"] * 5,
                         group_index=torch.arange(5))
    out = style_breakdown(task, batch, [1.0, 1.0, 1.0, 0.0, 1.0])
    assert list(out) == ["chain", "pairs", "other"]
    assert out["chain"] == pytest.approx({"share": 0.4, "accuracy": 100.0, "tpf": 80 / 22,
                                          "forwards_per_response": 11.0, "tokens_per_response": 40.0,
                                          "sound_accuracy": 50.0})
    assert out["pairs"] == pytest.approx({"share": 0.4, "accuracy": 50.0, "tpf": 4.0, "forwards_per_response": 10.0,
                                          "tokens_per_response": 40.0, "sound_accuracy": 50.0})
    assert out["other"]["accuracy"] == 100.0 and out["other"]["sound_accuracy"] == 0.0
