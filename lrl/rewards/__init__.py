"""Verifiers that turn completions into correctness (math final answers, sandboxed code tests; spec §3.1) and the
reward terms built on them (`lrl.rewards.terms`, docs/rewards.md)."""

from lrl.rewards.code import CodeResult, extract_code, run_tests, score_code
from lrl.rewards.math import (
    VerifierUnavailableError,
    is_correct,
    reset_timeout_count,
    score_math,
    timeout_count,
)
from lrl.rewards.terms import TPF, Accuracy, Distill, Function, PlannerSteps, RewardTerm

__all__ = [
    "TPF",
    "Accuracy",
    "CodeResult",
    "Distill",
    "Function",
    "PlannerSteps",
    "RewardTerm",
    "VerifierUnavailableError",
    "extract_code",
    "is_correct",
    "reset_timeout_count",
    "run_tests",
    "score_code",
    "score_math",
    "timeout_count",
]
