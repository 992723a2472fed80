"""The `Task` contract: a prompt source with its prompt template and verifier (spec §3.1, §6.1).

A task turns dataset rows into records ``{"question": str, "answer": str, ...}``, renders the prompt fed to the
model, and scores completions: accuracy (1.0 / 0.0) for math, test pass rate for code. Verifiers live in
``lrl.rewards`` and are imported lazily inside ``score`` so that loading prompts never needs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

TaskKind = Literal["math", "code"]

# Spec §6.1: 0-shot math prompt of the SDAR chat checkpoints (Qwen chat template, no system turn).
QWEN_MATH_TEMPLATE = (
    "<|im_start|>user\n{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
    "<|im_end|>\n<|im_start|>assistant\n"
)
# Spec §6.1: code prompt, function-test variant; the record's `prefix` is appended after the assistant header.
QWEN_CODE_TEMPLATE = (
    "<|im_start|>user\n{question}\nPlace your code within a single Python code block ```python ```. "
    "Do not include more than one code block. <|im_end|>\n<|im_start|>assistant\n"
)
# Spec §6.1: stdio variant (reads with input(), writes with print()).
QWEN_STDIO_TEMPLATE = (
    "<|im_start|>user\nThis is the problem:\n{question}\nYou should put your code in ```python ```. "
    "Use input() to read input and print() to output your answer.<|im_end|>\n<|im_start|>assistant\n"
)
# Chat-free template of the tiny demo models.
PLAIN_TEMPLATE = "Q: {question}\nA: "

QUESTION_PLACEHOLDER = "{question}"
# The Qwen chat frame of the spec §6.1 templates: what a checkpoint's own chat template re-creates.
QWEN_USER_OPEN = "<|im_start|>user\n"
QWEN_USER_CLOSE = "<|im_end|>\n<|im_start|>assistant\n"


def render_prompt(template: str, question: str) -> str:
    """Substitute ``{question}`` in ``template``.

    Plain replacement, not ``str.format``: templates contain literal braces (``\\boxed{}``).
    """
    if QUESTION_PLACEHOLDER not in template:
        raise ValueError(f"prompt template must contain {QUESTION_PLACEHOLDER!r}, got {template!r}")
    return template.replace(QUESTION_PLACEHOLDER, question)


def user_message_template(template: str) -> str:
    """The user turn of a prompt template: the text inside the Qwen chat frame for the spec §6.1 templates, the
    whole template for chat-free ones (e.g. ``"Q: {question}\\nA: "``)."""
    if template.startswith(QWEN_USER_OPEN) and template.endswith(QWEN_USER_CLOSE):
        return template[len(QWEN_USER_OPEN) : -len(QWEN_USER_CLOSE)]
    return template


def require_field(row: Mapping[str, Any], field: str, index: int, task: str) -> Any:
    """``row[field]``, or a ``ValueError`` naming the task, record index and missing field."""
    if field not in row or row[field] is None:
        raise ValueError(f"{task}: record {index} has no field {field!r} (available: {sorted(row)})")
    return row[field]


def gsm8k_final_answer(answer: str) -> str:
    """The final answer of a GSM8K-style solution: the text after the last ``####`` (commas dropped), else all.

    Spec §3.1: the ground truth is split on ``####`` when present.
    """
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip().replace(",", "")
    return answer.strip()


@dataclass
class Task(ABC):
    """A prompt source with a prompt template and a verifier.

    Args:
        name: Registry name, also used in error messages and logs.
        prompt_template: Template with a ``{question}`` placeholder.
    """

    kind: ClassVar[TaskKind]

    name: str = "task"
    prompt_template: str = PLAIN_TEMPLATE
    _chat_tokenizer: Any = field(default=None, init=False, repr=False, compare=False)

    @abstractmethod
    def load(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split`` (``"train"``, ``"eval"`` or ``"test"``), each with ``question`` and ``answer``."""

    def use_chat_template(self, tokenizer: Any | None) -> None:
        """Render prompts with ``tokenizer.apply_chat_template`` (one user turn, generation prompt on) from now on;
        None goes back to the template string. The user turn is the template's text inside the Qwen chat frame."""
        self._chat_tokenizer = tokenizer

    def render(self, question: str) -> str:
        """The prompt of ``question``: through the checkpoint's chat template when one is in use, else the
        template string."""
        tok = self._chat_tokenizer
        if tok is None:
            return render_prompt(self.prompt_template, question)
        user = render_prompt(user_message_template(self.prompt_template), question)
        return tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)

    def prompt(self, record: Mapping[str, Any]) -> str:
        """The prompt string fed to the model for ``record``."""
        return self.render(record["question"])

    @abstractmethod
    def ground_truth(self, record: Mapping[str, Any]) -> str:
        """What a correct completion must match (the final answer for math, the reference program for code)."""

    @abstractmethod
    def score(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        """One score per completion: 1.0/0.0 accuracy for math, pass rate in [0, 1] for code."""

    def _check_batch(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> None:
        if len(completions) != len(records):
            raise ValueError(
                f"{self.name}.score: {len(completions)} completions but {len(records)} records; pass one record "
                "per completion (repeat a prompt's record for each of its samples)"
            )


@dataclass
class MathTask(Task):
    """A task scored by final-answer equivalence (``lrl.rewards.math.score_math``, spec §3.1)."""

    kind: ClassVar[TaskKind] = "math"

    def ground_truth(self, record: Mapping[str, Any]) -> str:
        """The final answer: text after ``####`` for GSM8K-style answers, else the whole answer field."""
        return gsm8k_final_answer(str(record["answer"]))

    def score(self, completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        """1.0 where the completion's last ``\\boxed{}`` answer equals the ground truth, else 0.0."""
        self._check_batch(completions, records)
        from lrl.rewards.math import score_math  # lazy: verifier deps are not needed to load prompts

        truths = [self.ground_truth(r) for r in records]
        return [1.0 if ok else 0.0 for ok in score_math(list(completions), truths)]
