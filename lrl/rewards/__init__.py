"""Verifiers that turn completions into correctness: math final answers and sandboxed code tests (spec §3.1)."""

from lrl.rewards.code import CodeResult, extract_code, run_tests, score_code
from lrl.rewards.math import (
    VerifierUnavailableError,
    is_correct,
    reset_timeout_count,
    score_math,
    timeout_count,
)

__all__ = [
    "CodeResult",
    "VerifierUnavailableError",
    "extract_code",
    "is_correct",
    "reset_timeout_count",
    "run_tests",
    "score_code",
    "score_math",
    "timeout_count",
]
