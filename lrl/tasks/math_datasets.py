"""Math prompt sources read from datasets: GSM8K, MATH(-500) and any question/answer dataset (spec §6.1).

Field names are configurable so the same classes read the hub datasets and the SJTU-DENG-Lab json files
(``question`` / ``ground_truth_answer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lrl.tasks.base import QWEN_MATH_TEMPLATE, MathTask, require_field
from lrl.tasks.sources import DEFAULT_SPLITS, load_task_records


@dataclass
class MathDatasetTask(MathTask):
    """Question/answer math problems from a hub dataset or a local file.

    Records: ``{"question", "answer"}`` plus ``"solution"`` when ``solution_field`` is set. The answer may be a
    GSM8K-style worked solution ending in ``#### N`` (only ``N`` is compared) or a bare final answer.

    Args:
        name: Registry name.
        prompt_template: Template with ``{question}``; default: the Qwen chat template of spec §6.1.
        source: Hub dataset name or local ``.jsonl``/``.json``/``.parquet`` path (``{split}`` allowed).
        config: Hub configuration name.
        splits: Our split names (``train``/``eval``/``test``) → dataset split names.
        question_field: Row field holding the problem text.
        answer_field: Row field holding the answer.
        solution_field: Optional row field holding a worked solution (kept as ``solution``).
        limit: Keep only the first ``limit`` rows of each split.
        cache_dir: ``datasets`` cache directory.
    """

    name: str = "math_dataset"
    prompt_template: str = QWEN_MATH_TEMPLATE
    source: str = ""
    config: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    question_field: str = "question"
    answer_field: str = "answer"
    solution_field: str | None = None
    limit: int | None = None
    cache_dir: str | None = None

    def load(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split``; raises ``ValueError`` naming the record index and field when one is missing."""
        return load_task_records(self, split)

    def to_record(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        """One dataset row → record ``{"question", "answer"[, "solution"]}``."""
        record = {
            "question": str(require_field(row, self.question_field, index, self.name)),
            "answer": str(require_field(row, self.answer_field, index, self.name)),
        }
        if self.solution_field is not None:
            record["solution"] = str(require_field(row, self.solution_field, index, self.name))
        return record


@dataclass
class GSM8K(MathDatasetTask):
    """GSM8K (hub ``openai/gsm8k``, config ``main``): ``question`` and ``answer`` ending in ``#### N``."""

    name: str = "gsm8k"
    source: str = "openai/gsm8k"
    config: str | None = "main"


@dataclass
class MATH(MathDatasetTask):
    """MATH problems (default hub ``HuggingFaceH4/MATH-500``, test split only): ``problem``, ``solution``,
    ``answer``. For full MATH train sets point ``source`` elsewhere and adjust the field names."""

    name: str = "math"
    source: str = "HuggingFaceH4/MATH-500"
    config: str | None = None
    question_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
