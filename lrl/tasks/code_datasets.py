"""Code prompt sources with test-based verifiers: MBPP, HumanEval and generic function/stdio sets (spec §3.1, §6.1).

Records: ``{"question", "answer", "tests", "test_method", "prefix", "entry_point"}``. ``tests`` is a list of
assert statements (``test_method="function"``) or of ``{"input": str, "output": str}`` cases (``"stdio"``).
Scoring (spec §3.1): for function tests the record's ``prefix`` is prepended to the completion, the program is
extracted with ``lrl.rewards.code.extract_code`` and run with ``lrl.rewards.code.run_tests``; the score is the pass
rate (the fraction of tests passed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lrl.tasks.base import QWEN_CODE_TEMPLATE, QWEN_STDIO_TEMPLATE, Task, TaskKind, require_field
from lrl.tasks.sources import DEFAULT_SPLITS, load_task_records

TestMethod = Literal["function", "stdio"]


def pass_rate(result: Any) -> float:
    """Normalise what ``run_tests`` returns (a number, or one boolean per test) to a pass rate in [0, 1]."""
    if isinstance(result, bool | int | float):
        return float(result)
    outcomes = [bool(r) for r in result]
    return sum(outcomes) / len(outcomes) if outcomes else 0.0


@dataclass
class CodeTask(Task):
    """Programming problems from a hub dataset or a local file, scored by running their tests.

    Args:
        name: Registry name.
        prompt_template: Template with ``{question}``; ``None`` picks the spec §6.1 template of ``test_method``
            (:data:`~lrl.tasks.base.QWEN_CODE_TEMPLATE` or :data:`~lrl.tasks.base.QWEN_STDIO_TEMPLATE`).
        source: Hub dataset name or local ``.jsonl``/``.json``/``.parquet`` path (``{split}`` allowed).
        config: Hub configuration name.
        splits: Our split names (``train``/``eval``/``test``) → dataset split names.
        question_field: Row field with the problem statement.
        answer_field: Optional row field with a reference solution (the record's ``answer``; "" if unset).
        test_method: ``"function"`` (assert statements) or ``"stdio"`` (input/output pairs).
        tests_field: Function mode: row field with the list of assert statements.
        test_input_field: Stdio mode: row field with the list of inputs.
        test_output_field: Stdio mode: row field with the list of expected outputs.
        prefix_field: Optional row field with code the prompt ends with and the completion continues (§6.1).
        entry_point_field: Optional row field with the function name under test.
        tests_in_question: Append the assert statements to the question (tells the model the function name).
        timeout_s: Time limit per program run, passed to ``run_tests`` (upstream: 1 s limit + 2 s slack).
        limit: Keep only the first ``limit`` rows of each split.
        cache_dir: ``datasets`` cache directory.
    """

    kind: ClassVar[TaskKind] = "code"

    name: str = "code_dataset"
    prompt_template: str | None = None  # type: ignore[assignment]  # resolved in __post_init__
    source: str = ""
    config: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    question_field: str = "question"
    answer_field: str | None = None
    test_method: TestMethod = "function"
    tests_field: str = "test_list"
    test_input_field: str = "test_input"
    test_output_field: str = "test_output"
    prefix_field: str | None = None
    entry_point_field: str | None = None
    tests_in_question: bool = False
    timeout_s: float = 3.0
    limit: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.test_method not in ("function", "stdio"):
            raise ValueError(f"{self.name}: test_method must be 'function' or 'stdio', got {self.test_method!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"{self.name}: timeout_s must be > 0, got {self.timeout_s}")
        if self.prompt_template is None:
            self.prompt_template = QWEN_CODE_TEMPLATE if self.test_method == "function" else QWEN_STDIO_TEMPLATE

    def load(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split``; raises ``ValueError`` naming the record index and field when one is missing."""
        return load_task_records(self, split)

    def to_record(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        """One dataset row → code record."""
        question = str(require_field(row, self.question_field, index, self.name))
        tests = self.tests(row, index)
        if not tests:
            raise ValueError(f"{self.name}: record {index} has no tests")
        if self.tests_in_question and self.test_method == "function":
            question = f"{question}\nYour code should pass these tests:\n" + "\n".join(tests)
        return {
            "question": question,
            "answer": str(require_field(row, self.answer_field, index, self.name)) if self.answer_field else "",
            "tests": tests,
            "test_method": self.test_method,
            "prefix": str(require_field(row, self.prefix_field, index, self.name)) if self.prefix_field else "",
            "entry_point": (
                str(require_field(row, self.entry_point_field, index, self.name)) if self.entry_point_field else None
            ),
        }

    def tests(self, row: Mapping[str, Any], index: int) -> list[Any]:
        """The record's tests: assert strings (function mode) or ``{"input", "output"}`` dicts (stdio mode)."""
        if self.test_method == "function":
            tests = require_field(row, self.tests_field, index, self.name)
            if isinstance(tests, str):
                tests = [tests]
            return [str(t) for t in tests]
        inputs = require_field(row, self.test_input_field, index, self.name)
        outputs = require_field(row, self.test_output_field, index, self.name)
        if len(inputs) != len(outputs):
            raise ValueError(
                f"{self.name}: record {index} has {len(inputs)} {self.test_input_field!r} but "
                f"{len(outputs)} {self.test_output_field!r}"
            )
        return [{"input": str(i), "output": str(o)} for i, o in zip(inputs, outputs, strict=True)]

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The template with the question, followed by the record's code ``prefix`` (spec §6.1)."""
        return self.render(record["question"]) + record.get("prefix", "")

    def ground_truth(self, record: Mapping[str, Any]) -> str:
        """The reference solution ("" when the dataset has none); scoring uses the tests, not this."""
        return str(record.get("answer", ""))

    def score(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        """Pass rate of each completion's extracted program on its record's tests (spec §3.1)."""
        self._check_batch(completions, records)
        from lrl.rewards.code import extract_code, run_tests  # lazy: the sandbox is only needed to score

        scores = []
        for completion, record in zip(completions, records, strict=True):
            mode = record.get("test_method", self.test_method)
            # Function mode: the prompt ended with `prefix`, so the completion only continues it (spec §3.1).
            text = record.get("prefix", "") + completion if mode == "function" else completion
            program = extract_code(text)
            if not program:
                scores.append(0.0)
                continue
            scores.append(pass_rate(run_tests(program, record["tests"], self.timeout_s, mode=mode)))
        return scores


@dataclass
class MBPP(CodeTask):
    """MBPP (hub ``google-research-datasets/mbpp``, config ``full``): ``text``, ``test_list``, ``code``.

    The asserts are appended to the question by default, as they are the only place the function name appears.
    """

    name: str = "mbpp"
    source: str = "google-research-datasets/mbpp"
    config: str | None = "full"
    question_field: str = "text"
    answer_field: str | None = "code"
    tests_field: str = "test_list"
    tests_in_question: bool = True


@dataclass
class HumanEval(CodeTask):
    """HumanEval (hub ``openai/openai_humaneval``, test split only): ``prompt``, ``test``, ``entry_point``.

    The dataset's ``test`` defines ``check(candidate)``; the record holds one test that defines it and calls
    ``check(<entry_point>)``. The record's ``answer`` is the prompt plus ``canonical_solution`` when present.
    """

    name: str = "humaneval"
    source: str = "openai/openai_humaneval"
    config: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"eval": "test", "test": "test"})
    question_field: str = "prompt"
    answer_field: str | None = None
    tests_field: str = "test"
    entry_point_field: str | None = "entry_point"
    solution_field: str | None = "canonical_solution"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_method != "function":
            raise ValueError(f"{self.name}: HumanEval tests are function tests, got test_method={self.test_method!r}")
        if not self.entry_point_field:
            raise ValueError(f"{self.name}: entry_point_field is required to call check(<entry_point>)")

    def tests(self, row: Mapping[str, Any], index: int) -> list[str]:
        check = str(require_field(row, self.tests_field, index, self.name))
        entry_point = str(require_field(row, self.entry_point_field, index, self.name))
        return [f"{check}\n\ncheck({entry_point})\n"]

    def to_record(self, row: Mapping[str, Any], index: int) -> dict[str, Any]:
        record = super().to_record(row, index)
        if self.solution_field and row.get(self.solution_field) is not None:
            record["answer"] = record["question"] + str(row[self.solution_field])
        return record
