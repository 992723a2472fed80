"""Tests of lrl.tasks: the synthetic task, dataset loaders on local files, registry and scoring glue.

Verifiers (``lrl.rewards.math`` / ``lrl.rewards.code``) are replaced by fakes in ``sys.modules`` for the glue
tests; the tests against the real verifiers skip while those modules are not importable.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from lrl.tasks import (
    GSM8K,
    MATH,
    MBPP,
    QWEN_MATH_TEMPLATE,
    CodeTask,
    HumanEval,
    SyntheticArithmetic,
    available_tasks,
    get_task,
    register_task,
)
from lrl.tasks.synthetic import (
    MAX_QUESTION_CHARS,
    MAX_TARGET_CHARS,
    MAX_VALUE,
    MIN_QUESTION_CHARS,
    MIN_TARGET_CHARS,
)

# ---------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic() -> SyntheticArithmetic:
    return SyntheticArithmetic(num_train=3000, num_eval=300)


def _reference_from_question(question: str) -> int:
    """Slow reference: recompute the answer from the question text alone, sentence by sentence."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    assert sentences[-1] == "How many now?"
    first = sentences[0]
    m = re.fullmatch(r"[A-Z][a-z]+ has (\d+) (?:bags|boxes) of (\d+) [a-z]+", first)
    if m:
        x = int(m[1]) * int(m[2])
    else:
        m = re.fullmatch(r"[A-Z][a-z]+ has (\d+) [a-z]+", first)
        assert m, first
        x = int(m[1])
    for s in sentences[1:-1]:
        if m := re.fullmatch(r"(?:He|She) (?:buys|finds|gets) (\d+) more", s):
            x += int(m[1])
        elif m := re.fullmatch(r"(?:He|She) (?:sells|loses|drops) (\d+)", s):
            x -= int(m[1])
        elif s.endswith("doubles them"):
            x *= 2
        elif s.endswith("triples them"):
            x *= 3
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    return x


def _check_worked_steps(answer: str) -> int:
    """Parse 'a+b=c. c-d=e. #### e': every step is arithmetically right and uses the previous result."""
    body, final = answer.split(" #### ")
    steps = body.split(" ")
    previous = None
    for step in steps:
        m = re.fullmatch(r"(\d+)([+*-])(\d+)=(\d+)\.", step)
        assert m, step
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, step
        assert 0 <= c <= MAX_VALUE
        if previous is not None:
            assert a == previous, f"step {step!r} does not use the previous result {previous}"
        previous = c
    assert final == str(previous), "#### N must be the last step's result"
    return previous


def test_synthetic_deterministic_per_seed() -> None:
    a = SyntheticArithmetic(num_train=50, num_eval=20).load("train")
    b = SyntheticArithmetic(num_train=50, num_eval=20).load("train")
    c = SyntheticArithmetic(num_train=50, num_eval=20, train_seed=7).load("train")
    assert a == b
    assert [r["question"] for r in a] != [r["question"] for r in c]
    assert SyntheticArithmetic(num_train=50, num_eval=20).load("eval") == SyntheticArithmetic(
        num_train=50, num_eval=20
    ).load("test")


def test_synthetic_answers_are_correct(synthetic: SyntheticArithmetic) -> None:
    for record in synthetic.load("train") + synthetic.load("eval"):
        result = _check_worked_steps(record["answer"])
        assert result == _reference_from_question(record["question"]) == record["result"]
        assert synthetic.ground_truth(record) == str(result)
        assert len(record["answer"].split(" #### ")[0].split(" ")) == record["num_steps"]


def test_synthetic_target_response(synthetic: SyntheticArithmetic) -> None:
    record = synthetic.load("train")[0]
    target = synthetic.target_response(record)
    steps = record["answer"].split(" #### ")[0]
    assert target == f"{steps} \\boxed{{{record['result']}}}"
    for r in synthetic.load("train"):
        assert synthetic.target_response(r).endswith(f"\\boxed{{{r['result']}}}")
    # hand example from the docstring
    assert synthetic.target_response({"answer": "7+5=12. 12-3=9. #### 9"}) == "7+5=12. 12-3=9. \\boxed{9}"


def test_synthetic_eval_disjoint_from_train_and_unique(synthetic: SyntheticArithmetic) -> None:
    train = [r["question"] for r in synthetic.load("train")]
    evals = [r["question"] for r in synthetic.load("eval")]
    assert len(train) == 3000 and len(evals) == 300
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def test_synthetic_lengths_and_char_set(synthetic: SyntheticArithmetic) -> None:
    chars = set(synthetic.char_set())
    assert len(chars) == len(synthetic.char_set())  # no duplicates
    for r in synthetic.load("train") + synthetic.load("eval"):
        target = synthetic.target_response(r)
        assert MIN_QUESTION_CHARS <= len(r["question"]) <= MAX_QUESTION_CHARS, r["question"]
        assert MIN_TARGET_CHARS <= len(target) <= MAX_TARGET_CHARS, target
        for text in (r["question"], r["answer"], target, synthetic.prompt(r)):
            assert set(text) <= chars, set(text) - chars


def test_synthetic_uses_all_steps_and_ops(synthetic: SyntheticArithmetic) -> None:
    records = synthetic.load("train")
    assert {r["num_steps"] for r in records} == {2, 3}
    ops = "".join(r["answer"] for r in records)
    assert all(op in ops for op in "+-*")
    assert all(any(s in r["answer"] for s in [str(n) for n in range(10, 100)]) for r in records)  # multi-digit


def test_synthetic_prompt_and_validation() -> None:
    task = SyntheticArithmetic(num_train=1, num_eval=1)
    assert task.prompt({"question": "Tom has 3 pens."}) == "Q: Tom has 3 pens.\nA: "
    with pytest.raises(ValueError, match="steps"):
        SyntheticArithmetic(steps=(4,))
    with pytest.raises(ValueError, match="seed"):
        SyntheticArithmetic(train_seed=3, eval_seed=3)
    with pytest.raises(ValueError, match="split"):
        task.load("validation")


def test_synthetic_score_calls_score_math(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    def fake_score_math(completions: list[str], truths: list[str]) -> list[bool]:
        calls["args"] = (completions, truths)
        return [f"\\boxed{{{t}}}" in c for c, t in zip(completions, truths, strict=True)]

    monkeypatch.setitem(sys.modules, "lrl.rewards.math", types.SimpleNamespace(score_math=fake_score_math))
    task = SyntheticArithmetic(num_train=4, num_eval=1)
    records = task.load("train")[:2]
    completions = [task.target_response(records[0]), "1+1=2. \\boxed{-5}"]
    assert task.score(completions, records) == [1.0, 0.0]
    assert calls["args"][1] == [str(records[0]["result"]), str(records[1]["result"])]
    with pytest.raises(ValueError, match="records"):
        task.score(completions, records[:1])


def test_synthetic_score_real_verifier() -> None:
    pytest.importorskip("lrl.rewards.math")
    task = SyntheticArithmetic(num_train=20, num_eval=1)
    records = task.load("train")
    good = [task.target_response(r) for r in records]
    bad = [f"1+1=2. \\boxed{{{r['result'] + 1}}}" for r in records]
    assert task.score(good, records) == [1.0] * len(records)
    assert task.score(bad, records) == [0.0] * len(records)


# ---------------------------------------------------------------------------------------------------------------
# dataset-backed tasks on local files
# ---------------------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_local_jsonl(tmp_path: Path) -> None:
    rows = [
        {"question": "Ann has 3 cats and gets 4 more. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "What is 1,000 + 234?", "answer": "1000+234=1234\n#### 1,234"},
    ]
    _write_jsonl(tmp_path / "gsm_test.jsonl", rows)
    task = GSM8K(source=str(tmp_path / "gsm_{split}.jsonl"), cache_dir=str(tmp_path / "cache"))
    records = task.load("eval")  # eval → dataset split "test" → gsm_test.jsonl
    assert [r["question"] for r in records] == [r["question"] for r in rows]
    assert [task.ground_truth(r) for r in records] == ["7", "1234"]
    assert task.prompt(records[0]) == (
        "<|im_start|>user\nAnn has 3 cats and gets 4 more. How many?\nPlease reason step by step, and put your "
        "final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert task.kind == "math"
    with pytest.raises(FileNotFoundError, match="gsm_train.jsonl"):
        task.load("train")


def test_math_dataset_fields_and_custom_template(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "math.jsonl", [{"problem": "Compute $1/2+1/2$.", "solution": "It is \\boxed{1}.", "answer": "1"}]
    )
    task = MATH(source=path, prompt_template="Problem: {question}\nSolution:", cache_dir=str(tmp_path / "c"))
    (record,) = task.load("test")
    assert record == {"question": "Compute $1/2+1/2$.", "answer": "1", "solution": "It is \\boxed{1}."}
    assert task.ground_truth(record) == "1"
    assert task.prompt(record) == "Problem: Compute $1/2+1/2$.\nSolution:"


def test_missing_field_names_record_and_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q0", "answer": "1"}, {"question": "q1", "answer": None}])
    with pytest.raises(ValueError, match=r"record 1 has no field 'answer'"):
        GSM8K(source=path, cache_dir=str(tmp_path / "c")).load("train")
    with pytest.raises(ValueError, match=r"record 0 has no field 'ground_truth_answer'"):
        GSM8K(source=path, answer_field="ground_truth_answer", cache_dir=str(tmp_path / "c")).load("train")


def test_mbpp_local_jsonl(tmp_path: Path) -> None:
    rows = [
        {
            "task_id": 1,
            "text": "Write a function to add two numbers.",
            "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        }
    ]
    task = MBPP(source=_write_jsonl(tmp_path / "mbpp.jsonl", rows), cache_dir=str(tmp_path / "c"))
    (record,) = task.load("train")
    assert record["tests"] == rows[0]["test_list"]
    assert record["test_method"] == "function"
    assert record["answer"] == rows[0]["code"]
    assert record["prefix"] == ""
    assert "assert add(1, 2) == 3" in record["question"]  # tests shown: the only place the name appears
    assert task.prompt(record).startswith("<|im_start|>user\nWrite a function to add two numbers.")
    assert task.kind == "code"


def _humaneval_rows() -> list[dict]:
    return [
        {
            "task_id": "HumanEval/0",
            "prompt": 'def inc(x):\n    """Return x + 1."""\n',
            "canonical_solution": "    return x + 1\n",
            "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n",
            "entry_point": "inc",
        }
    ]


def test_humaneval_local_jsonl(tmp_path: Path) -> None:
    task = HumanEval(source=_write_jsonl(tmp_path / "he.jsonl", _humaneval_rows()), cache_dir=str(tmp_path / "c"))
    (record,) = task.load("test")
    (test,) = record["tests"]
    assert test.startswith("def check(candidate):") and test.rstrip().endswith("check(inc)")
    assert record["entry_point"] == "inc"
    assert record["answer"] == _humaneval_rows()[0]["prompt"] + "    return x + 1\n"
    # the combined test really defines and calls check(): run it on the canonical solution
    namespace: dict = {}
    exec(record["answer"] + "\n" + test, namespace)  # noqa: S102 - trusted test fixture
    with pytest.raises(ValueError, match="split"):
        task.load("train")  # HumanEval has only a test split


def test_code_score_glue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def extract_code(text: str) -> str | None:
        m = re.search(r"```python\n(.*?)```", text, re.S)
        return m[1] if m else None

    def run_tests(program: str, tests: list, timeout_s: float, mode: str = "function") -> list[bool]:
        seen.append((program, tests, timeout_s, mode))
        return [True, False]

    monkeypatch.setitem(
        sys.modules, "lrl.rewards.code", types.SimpleNamespace(extract_code=extract_code, run_tests=run_tests)
    )
    rows = [{"text": "Add.", "code": "", "test_list": ["assert f(1) == 1", "assert f(2) == 2"], "pre": "```python\n"}]
    task = MBPP(
        source=_write_jsonl(tmp_path / "m.jsonl", rows), prefix_field="pre", timeout_s=2.0, cache_dir=str(tmp_path)
    )
    (record,) = task.load("train")
    assert task.prompt(record).endswith("<|im_start|>assistant\n```python\n")  # prefix appended (§6.1)
    scores = task.score(["def f(x):\n    return x\n```", "no code here"], [record, {**record, "prefix": ""}])
    assert scores == [0.5, 0.0]  # pass rate of [True, False]; no extractable code → 0
    assert seen == [("def f(x):\n    return x\n", record["tests"], 2.0, "function")]


def test_code_stdio_records(tmp_path: Path) -> None:
    rows = [{"question": "Echo.", "test_input": ["1\n", "2\n"], "test_output": ["1\n", "2\n"]}]
    task = CodeTask(source=_write_jsonl(tmp_path / "s.jsonl", rows), test_method="stdio", cache_dir=str(tmp_path))
    (record,) = task.load("train")
    assert record["tests"] == [{"input": "1\n", "output": "1\n"}, {"input": "2\n", "output": "2\n"}]
    assert "Use input()" in task.prompt(record)
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"question": "Echo.", "test_input": ["1"], "test_output": []}])
    with pytest.raises(ValueError, match="record 0"):
        CodeTask(source=bad, test_method="stdio", cache_dir=str(tmp_path)).load("train")


def test_humaneval_real_verifier(tmp_path: Path) -> None:
    pytest.importorskip("lrl.rewards.code")
    task = HumanEval(source=_write_jsonl(tmp_path / "he.jsonl", _humaneval_rows()), cache_dir=str(tmp_path / "c"))
    (record,) = task.load("test")
    good = f"```python\n{record['answer']}```"
    bad = "```python\ndef inc(x):\n    return x\n```"
    assert task.score([good, bad], [record, record]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def test_registry_builtins_and_kwargs() -> None:
    assert {"synthetic", "gsm8k", "math", "mbpp", "humaneval"} <= set(available_tasks())
    task = get_task("synthetic", num_train=5, num_eval=2)
    assert isinstance(task, SyntheticArithmetic) and len(task.load("train")) == 5
    gsm = get_task("gsm8k", limit=3)
    assert gsm.source == "openai/gsm8k" and gsm.config == "main" and gsm.prompt_template == QWEN_MATH_TEMPLATE


def test_registry_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*gsm8k.*synthetic"):
        get_task("nope")


def test_register_task_duplicate_and_decorator() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_task("synthetic", SyntheticArithmetic)

    @register_task("tiny_synthetic_for_test", overwrite=True)
    def tiny(**kwargs) -> SyntheticArithmetic:
        return SyntheticArithmetic(num_train=2, num_eval=1, **kwargs)

    assert len(get_task("tiny_synthetic_for_test").load("train")) == 2
