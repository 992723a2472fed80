"""Run generated programs against their tests in a throw-away sandbox (spec §3.1, code correctness).

Every run gets a fresh temporary directory (its working directory, deleted afterwards) and its own process:
``python -I`` with a scrubbed environment, in a new session/process group, with rlimits set before exec (CPU
time, address space ~1 GiB, file size, open files, no core dumps), a wall-clock limit after which the whole
process group is SIGKILLed, and a bound on captured stdout+stderr (the run is killed when it is exceeded).
A trusted launcher forks the untrusted code, so ``os.getppid()`` is the launcher, never the scorer.

Where bubblewrap works (checked once by running ``python -I -c pass`` under it), the run is also wrapped in
``bwrap``: read-only root, private ``/tmp`` and ``/dev``, only the run's directory writable, no network, new PID
namespace (killing bwrap kills everything inside), no capabilities. If bwrap is missing or broken the sandbox
falls back to rlimits alone and warns once; ``use_bwrap=False`` or ``LRL_SANDBOX_BWRAP=0`` force the fallback.

Process count: rlimits cannot cap it for root (RLIMIT_NPROC is ignored for root, also inside bwrap), so as root
each run is put in its own ``pids`` cgroup (``pids.max = max_processes``) when the cgroup hierarchy is writable;
as a normal user RLIMIT_NPROC is set to the user's current task count plus ``max_processes``. With neither
(root without a writable cgroup) a fork bomb is only stopped by the wall-clock kill; this is warned about once.

What this sandbox does NOT protect against — it is not a security boundary:

* Fallback mode (no bwrap): the program runs as the scorer's user and can read every file that user can read,
  write or delete files outside its directory (only its working directory is private), use the network,
  signal other processes of that user (as root: any process, e.g. ``os.kill(-1, 9)``; only the direct
  ``os.getppid()`` attack is blocked), and call anything through ``ctypes``.
* Both modes: the program can read the whole (read-only) filesystem, including secrets readable by the user,
  and can burn CPU for the whole time limit. Kernel exploits are out of scope.
* Function-mode results travel over a private pipe tagged with a random nonce; code in the same interpreter can
  still find the nonce by introspection, and objects with a forged ``__eq__`` can make asserts pass.

This module is the public API (`run_tests`, `score_code`, `extract_code`, `CodeResult`); the process machinery
(probes, launcher harness, one bounded run) is in `lrl.rewards.code_sandbox`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from lrl.rewards.code_sandbox import _execute, _Run, bwrap_available, sandbox_info  # noqa: F401 - the last two re-exported
from lrl.rewards.math import EOS_MARKERS, cut_at_eos

TestMode = Literal["function", "stdio"]
StdioCase = tuple[str, str] | Mapping[str, str]

_PY_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\r?\n(.*?)```", re.DOTALL)
_OPEN_PY_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)


@dataclass(frozen=True)
class CodeResult:
    """Outcome of one program on its tests.

    Attributes:
        passed: Number of tests passed.
        total: Number of tests.
        outcomes: One bool per test, in order (iterating the result yields these).
        failures: One reason per failed test, ``"test i: reason"``.
        timed_out: The wall-clock limit was hit (in stdio mode: by at least one test).
        sandbox: ``"bwrap"`` or ``"rlimits"`` (fallback).
        elapsed_s: Wall-clock seconds spent running the program(s).
    """

    passed: int
    total: int
    outcomes: list[bool]
    failures: list[str]
    timed_out: bool
    sandbox: str
    elapsed_s: float

    @property
    def pass_rate(self) -> float:
        """Fraction of tests passed (the code accuracy reward, spec §3.3)."""
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        """Every test passed (the evaluation's code accuracy, spec §6.2)."""
        return self.total > 0 and self.passed == self.total

    def __iter__(self):
        return iter(self.outcomes)

    def __len__(self) -> int:
        return self.total


# ---------------------------------------------------------------------------------------------- public API
def _abort_reason(run: _Run, timeout_s: float) -> str:
    if run.timed_out:
        return f"timed out after {timeout_s:g}s"
    if run.output_exceeded:
        return "output limit exceeded"
    tail = run.stderr.decode("utf-8", errors="replace").strip().splitlines()
    return f"exited with code {run.returncode}" + (f" ({tail[-1][:200]})" if tail else "")


def _normalise_output(text: str) -> str:
    return " ".join(text.split())


def _stdio_case(i: int, case) -> tuple[str, str]:
    if isinstance(case, Mapping) and "input" in case and "output" in case:
        case = (case["input"], case["output"])
    if isinstance(case, tuple | list) and len(case) == 2 and all(isinstance(x, str) for x in case):
        return case[0], case[1]
    raise ValueError(f"tests[{i}]: stdio tests must be (input, expected_output) str pairs or "
                     f"{{'input', 'output'}} mappings, got {case!r:.80}")


def run_tests(
    program: str,
    tests: Sequence[str] | Sequence[StdioCase],
    timeout_s: float = 5.0,
    *,
    mode: TestMode = "function",
    memory_bytes: int = 1 << 30,
    max_output_bytes: int = 1 << 20,
    max_processes: int | None = 64,
    use_bwrap: bool | None = None,
    tmp_root: str | None = None,
) -> CodeResult:
    """Run ``program`` against ``tests`` in the sandbox described in the module docstring.

    ``function`` mode (MBPP/HumanEval): one process executes the program, then each test (an assert statement or
    any code block) separately in the program's namespace; a test passes when it raises nothing. Results come back
    over a private pipe tagged with a nonce. If the program itself fails — a syntax error, an exception, or
    ``sys.exit()``/``os._exit()`` before the tests — every test fails (the released code counted ``SystemExit``
    as a pass). ``timeout_s`` bounds the whole run; tests without a result when it is hit fail.

    ``stdio`` mode: each test is ``(input, expected_output)`` (or ``{"input", "output"}``); the program runs once
    per test as a script (``__name__ == "__main__"``) in a fresh directory with that input on stdin, and passes
    when it exits with status 0 and its stdout equals the expected output after collapsing whitespace.
    ``timeout_s`` applies to each test.

    Args:
        program: Python source.
        tests: Assert strings (function mode) or stdio cases.
        timeout_s: Wall-clock limit in seconds (> 0); CPU time is limited to about the same.
        mode: ``"function"`` or ``"stdio"``.
        memory_bytes: Address-space limit of each process.
        max_output_bytes: Cap on captured stdout+stderr; a run producing more is killed.
        max_processes: Cap on processes/threads of a run (see the module docstring); ``None`` disables it.
        use_bwrap: ``None`` uses bubblewrap when it works (env ``LRL_SANDBOX_BWRAP=0`` disables it), ``True``
            requires it, ``False`` uses the rlimit-only fallback.
        tmp_root: Directory for the per-run temporary directories (default: the system temp dir).

    Returns:
        The per-test outcomes and failure reasons.

    Raises:
        ValueError: malformed ``program``, ``tests``, ``mode`` or limits.
        RuntimeError: ``use_bwrap=True`` but bubblewrap does not work here.
    """
    if not isinstance(program, str):
        raise ValueError(f"program must be a str, got {type(program).__name__}")
    if mode not in ("function", "stdio"):
        raise ValueError(f"mode must be 'function' or 'stdio', got {mode!r}")
    if isinstance(tests, str | bytes) or not isinstance(tests, Sequence) or len(tests) == 0:
        raise ValueError(f"tests must be a non-empty list, got {tests!r:.80}")
    if not timeout_s > 0 or memory_bytes <= 0 or max_output_bytes <= 0:
        raise ValueError(f"timeout_s, memory_bytes and max_output_bytes must be > 0, got {timeout_s}, "
                         f"{memory_bytes}, {max_output_bytes}")
    if max_processes is not None and max_processes < 1:
        raise ValueError(f"max_processes must be >= 1 or None, got {max_processes}")
    if use_bwrap is None:
        bwrap = os.environ.get("LRL_SANDBOX_BWRAP", "1") != "0" and bwrap_available()
    elif use_bwrap:
        if not bwrap_available():
            raise RuntimeError("run_tests(use_bwrap=True): bubblewrap does not work on this machine")
        bwrap = True
    else:
        bwrap = False
    opts = dict(timeout_s=timeout_s, memory_bytes=memory_bytes, max_output_bytes=max_output_bytes,
                max_processes=max_processes, bwrap=bwrap, tmp_root=tmp_root)
    start = time.monotonic()
    if mode == "function":
        for i, t in enumerate(tests):
            if not isinstance(t, str):
                raise ValueError(f"tests[{i}]: function tests must be str, got {type(t).__name__}")
        outcomes, failures, timed_out = _function_tests(program, list(tests), opts)
    else:
        cases = [_stdio_case(i, c) for i, c in enumerate(tests)]
        outcomes, failures, timed_out = _stdio_tests(program, cases, opts)
    return CodeResult(passed=sum(outcomes), total=len(outcomes), outcomes=outcomes, failures=failures,
                      timed_out=timed_out, sandbox="bwrap" if bwrap else "rlimits",
                      elapsed_s=time.monotonic() - start)


def _function_tests(program: str, tests: list[str], opts: dict) -> tuple[list[bool], list[str], bool]:
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "tests": tests}).encode()
    run = _execute({"solution.py": program}, payload, ["function"], result_channel=True, **opts)
    records: dict[int, tuple[bool, str]] = {}
    for line in run.results.decode("utf-8", errors="replace").splitlines():
        try:
            tag, i, ok, why = json.loads(line)
        except (ValueError, TypeError):
            continue
        if tag == nonce and isinstance(i, int) and -1 <= i < len(tests) and i not in records:
            records[i] = (ok is True, str(why))
    outcomes, failures = [], []
    for i in range(len(tests)):
        if -1 in records:
            ok, why = False, f"program failed before the tests: {records[-1][1]}"
        elif i in records:
            ok, why = records[i]
        else:
            ok, why = False, f"no result ({_abort_reason(run, opts['timeout_s'])})"
        outcomes.append(ok)
        if not ok:
            failures.append(f"test {i}: {why or 'failed'}")
    return outcomes, failures, run.timed_out


def _stdio_tests(program: str, cases: list[tuple[str, str]], opts: dict) -> tuple[list[bool], list[str], bool]:
    outcomes, failures, any_timeout = [], [], False
    for i, (stdin_text, expected) in enumerate(cases):
        run = _execute({"solution.py": program}, stdin_text.encode(), ["stdio"], result_channel=False, **opts)
        any_timeout |= run.timed_out
        got = run.stdout.decode("utf-8", errors="replace")
        if run.timed_out or run.output_exceeded or run.returncode != 0:
            why = _abort_reason(run, opts["timeout_s"])
        elif _normalise_output(got) != _normalise_output(expected):
            why = f"wrong output: expected {_normalise_output(expected)[:100]!r}, got {_normalise_output(got)[:100]!r}"
        else:
            why = ""
        outcomes.append(not why)
        if why:
            failures.append(f"test {i}: {why}")
    return outcomes, failures, any_timeout


def score_code(
    programs: Sequence[str],
    tests_list: Sequence[Sequence[str] | Sequence[StdioCase]],
    timeout_s: float = 5.0,
    *,
    max_workers: int | None = None,
    **kwargs,
) -> list[CodeResult]:
    """:func:`run_tests` for many programs in parallel (threads, each driving its own subprocesses).

    Args:
        programs: N programs.
        tests_list: N test lists (one per program).
        timeout_s: Per-run limit, as in :func:`run_tests`.
        max_workers: Concurrent runs (default ``min(8, cpu_count)``).
        **kwargs: Passed to :func:`run_tests` (``mode``, limits, ``use_bwrap``...).

    Returns:
        N results, in input order.
    """
    if len(programs) != len(tests_list):
        raise ValueError(f"score_code: {len(programs)} programs but {len(tests_list)} test lists")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"score_code: max_workers must be >= 1, got {max_workers}")
    if not programs:
        return []
    workers = min(len(programs), max_workers or min(8, os.cpu_count() or 1))
    if kwargs.get("use_bwrap") is None:
        bwrap_available()  # probe (and warn) once, not from every thread
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lrl-score-code") as ex:
        return list(ex.map(lambda pt: run_tests(pt[0], pt[1], timeout_s, **kwargs), zip(programs, tests_list)))


def extract_code(completion: str, eos_markers: Sequence[str] = EOS_MARKERS) -> str:
    """The program in a completion: the last fenced python block, else the last fenced block, else the text.

    An opening python fence that is never closed (truncated output) yields everything after it.

    Raises:
        ValueError: ``completion`` is not a str.
    """
    if not isinstance(completion, str):
        raise ValueError(f"completion must be a str, got {type(completion).__name__}")
    text = cut_at_eos(completion, eos_markers)
    for pattern in (_PY_FENCE, _ANY_FENCE):
        blocks = pattern.findall(text)
        if blocks:
            return blocks[-1]
    opened = list(_OPEN_PY_FENCE.finditer(text))
    if opened:
        return text[opened[-1].end():]
    return text
