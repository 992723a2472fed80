"""Prompt sources with prompt templates and verifiers (spec §3.1, §6.1)."""

from lrl.tasks.base import (
    PLAIN_TEMPLATE,
    QWEN_CODE_TEMPLATE,
    QWEN_MATH_TEMPLATE,
    QWEN_STDIO_TEMPLATE,
    MathTask,
    Task,
    TaskKind,
    render_prompt,
)
from lrl.tasks.code_datasets import MBPP, CodeTask, HumanEval
from lrl.tasks.math_datasets import GSM8K, MATH, MathDatasetTask
from lrl.tasks.registry import available_tasks, get_task, register_task
from lrl.tasks.synthetic import SyntheticArithmetic, synthetic_char_set

__all__ = [
    "GSM8K",
    "MATH",
    "MBPP",
    "PLAIN_TEMPLATE",
    "QWEN_CODE_TEMPLATE",
    "QWEN_MATH_TEMPLATE",
    "QWEN_STDIO_TEMPLATE",
    "CodeTask",
    "HumanEval",
    "MathDatasetTask",
    "MathTask",
    "SyntheticArithmetic",
    "Task",
    "TaskKind",
    "available_tasks",
    "get_task",
    "register_task",
    "render_prompt",
    "synthetic_char_set",
]
