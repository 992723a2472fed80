"""Final-answer correctness for math tasks (spec §3.1), safe to call from any thread.

Scoring rules (deliberate choices, all tested):

* The completion is cut at the first end-of-sequence marker; text after it is ignored.
* The prediction is the content of the **last** ``\\boxed{...}`` (brace-matched; escaped ``\\{``/``\\}`` do not
  count). A completion without a box, or whose last box is never closed (truncated output), is **wrong**: an
  unboxed "The answer is 42" is not accepted, because the prompt asks for a box and a lenient extractor rewards
  unformatted answers. ``\\boxed 5`` (no braces) is not recognised either.
* The ground truth is the text after ``####`` when present (GSM8K), else the whole string (or its last box).
* Fast path: when both sides are plain numbers (after removing ``$``, a trailing ``.``, thousands commas and
  LaTeX thin spaces) they are compared exactly as decimals, without math-verify; the result is final.
* Otherwise math-verify (``parse`` then ``verify(gold, pred)``) decides: fractions, ``\\frac12`` vs ``0.5``,
  percent signs, equivalent expressions, sets, intervals.

math-verify's own timeout uses ``signal.alarm`` and raises outside the main thread, so it is disabled
(``parsing_timeout=None``, ``timeout_seconds=None``) and the time limit is enforced here instead: every
math-verify call runs in a small persistent pool of worker processes (created lazily), each a fresh
``python -m lrl.rewards.math_worker`` that never imports the caller's ``__main__``: answers are the same from a
guarded or unguarded script, stdin, ``python -c``, threads or a notebook. When a call exceeds ``timeout_s`` its
worker is killed (SIGKILL) and replaced, and the answer counts as wrong; such timeouts are counted (log
:func:`timeout_count` as ``reward/timeouts``). A verifier that cannot run never scores an answer: a worker that
dies is replaced and the check retried once, and when no worker starts (or the retry dies too) the call raises
:class:`VerifierUnavailableError`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation

from lrl.rewards.math_worker import verify_equal

logger = logging.getLogger(__name__)

EOS_MARKERS: tuple[str, ...] = ("<|endoftext|>", "<|im_end|>", "</s>")
_STARTUP_TIMEOUT_S = 120.0  # importing sympy/math-verify in a fresh worker; not part of a check's time limit
_BOXED = re.compile(r"\\boxed\s*\{")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


# ---------------------------------------------------------------------------------------------- text handling
def cut_at_eos(text: str, eos_markers: Sequence[str] = EOS_MARKERS) -> str:
    """The text before the first end-of-sequence marker (the whole text when there is none)."""
    cut = len(text)
    for marker in eos_markers:
        if marker:
            i = text.find(marker)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, brace-matched; ``None`` if there is none or it is never closed."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (e.g. \{ or \}) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


def ground_truth_answer(ground_truth: str) -> str:
    """The final answer of a ground-truth string: after ``####`` (GSM8K), else its last box, else all of it."""
    if "####" in ground_truth:
        return ground_truth.rsplit("####", 1)[1].strip()
    boxed = last_boxed(ground_truth)
    return boxed if boxed is not None else ground_truth.strip()


def as_plain_number(text: str) -> Decimal | None:
    """The value of ``text`` if it is a plain decimal number (``$``, ``\\$``, trailing ``.``, commas allowed)."""
    s = text.strip().replace("\\$", "").replace("$", "").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    s = s.strip().rstrip(".").replace(" ", "")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.match(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
        return None


# ---------------------------------------------------------------------------------------------- parent side
_verify_in_worker = verify_equal  # the check every worker runs (kept under its old name for callers)


class VerifierUnavailableError(RuntimeError):
    """The math verifier cannot run (its worker does not start, or dies twice on one check): no answer is given,
    because scoring it False would be a silent lie."""


def _worker_env() -> dict[str, str]:
    # the worker imports exactly what this process can: lrl (installed or on PYTHONPATH) and the module of `fn`
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")


class _Worker:
    """One ``python -m lrl.rewards.math_worker`` process and its socket."""

    def __init__(self) -> None:
        self.conn, child = mp.Pipe(duplex=True)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lrl.rewards.math_worker", str(child.fileno())],
                pass_fds=(child.fileno(),), env=_worker_env(), stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            self.conn.close()
            raise VerifierUnavailableError(f"math verifier worker could not be started: {exc}") from exc
        finally:
            child.close()
        try:
            ready = self.conn.poll(_STARTUP_TIMEOUT_S)
            status, detail = self.conn.recv() if ready else ("error", f"not ready after {_STARTUP_TIMEOUT_S:.0f} s")
        except (EOFError, OSError):
            status, detail = "error", f"exited with code {self.proc.poll()} while starting"
        if status != "ready":
            self.kill()
            raise VerifierUnavailableError(f"math verifier worker did not start: {detail}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        self.conn.close()


class VerifierPool:
    """At most ``max_workers`` persistent worker processes; a check that overruns its time limit kills its worker.

    Thread-safe: each call takes an idle worker (starting one if below the cap, else waiting), sends one request
    and waits for the answer with ``Connection.poll(timeout)``. Workers are ``python -m lrl.rewards.math_worker``
    processes, independent of the caller's ``__main__``.

    Args:
        max_workers: Cap on live worker processes.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"VerifierPool.max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0
        self._closed = False
        self.pid = os.getpid()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise VerifierUnavailableError("VerifierPool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.max_workers:
                    self._live += 1
                    break
                self._cond.wait()
        try:  # start outside the lock: it takes a second or so
            return _Worker()
        except BaseException:
            self._discard(None)
            raise

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker | None) -> None:
        if worker is not None:
            worker.kill()
        with self._cond:
            self._live -= 1
            self._cond.notify()

    def call(self, fn, args: tuple, timeout_s: float) -> bool | None:
        """``fn(*args)`` in a worker; ``None`` when it ran past ``timeout_s`` (the worker is then killed).

        ``fn`` must be importable by name (not defined in ``__main__``). A worker that dies is replaced and the
        check retried once (it may have been killed for reasons unrelated to this input, e.g. the OOM killer).

        Raises:
            VerifierUnavailableError: no worker starts, or the check killed two workers in a row.
        """
        if getattr(fn, "__module__", None) == "__main__":
            raise ValueError("VerifierPool.call: fn must live in an importable module, not __main__")
        for attempt in range(2):
            worker = self._acquire()  # VerifierUnavailableError propagates: no answer rather than a wrong one
            try:
                worker.conn.send((fn, args))
                if not worker.conn.poll(timeout_s):
                    self._discard(worker)  # hung: kill it; the next call starts a fresh one
                    return None
                result = worker.conn.recv()
            except (EOFError, OSError):  # died (idle or while checking): retry once in a fresh worker
                self._discard(worker)
                logger.warning("math verifier worker died (attempt %d of 2); restarting it", attempt + 1)
                continue
            self._release(worker)
            return bool(result)
        raise VerifierUnavailableError(f"math verifier workers died twice on one check of {args!r}")

    def close(self) -> None:
        """Stop every idle worker; busy ones are stopped when their call returns."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
            self._cond.notify_all()
        for w in idle:
            w.kill()


_pool: VerifierPool | None = None
_pool_lock = threading.Lock()
_max_workers = max(1, min(4, os.cpu_count() or 1))
_timeouts = 0
_count_lock = threading.Lock()


def _get_pool() -> VerifierPool:
    global _pool
    with _pool_lock:
        # A forked child must not share its parent's pipes (nor a closed pool): it gets its own pool.
        if _pool is None or _pool.pid != os.getpid() or _pool._closed:
            _pool = VerifierPool(_max_workers)
        return _pool


def set_max_workers(n: int) -> None:
    """Cap the verifier worker processes (default ``min(4, cpu_count)``); restarts the pool if it exists."""
    global _max_workers, _pool
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_max_workers: n must be an int >= 1, got {n!r}")
    with _pool_lock:
        _max_workers = n
        if _pool is not None and _pool.pid == os.getpid():
            _pool.close()
        _pool = None


def shutdown() -> None:
    """Stop the worker processes (they also exit with the parent). The next check starts a new pool."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool.pid == os.getpid():
            _pool.close()
        _pool = None


atexit.register(shutdown)


def timeout_count() -> int:
    """Math-verify checks abandoned since the last reset (timed out or worker died); log as ``reward/timeouts``."""
    return _timeouts


def reset_timeout_count() -> int:
    """Reset the abandoned-check counter; returns its value before the reset."""
    global _timeouts
    with _count_lock:
        n, _timeouts = _timeouts, 0
    return n


def _count_timeout() -> None:
    global _timeouts
    with _count_lock:
        _timeouts += 1


# ---------------------------------------------------------------------------------------------- public API
def _check_str(name: str, value, *, allow_numbers: bool = False) -> str:
    if allow_numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _extract_pair(completion: str, ground_truth: str, eos_markers: Sequence[str]) -> tuple[str | None, str]:
    gold = ground_truth_answer(ground_truth)
    if not gold:
        raise ValueError(f"ground_truth has no answer: {ground_truth!r}")
    return last_boxed(cut_at_eos(completion, eos_markers)), gold


def _decide(pred: str | None, gold: str, timeout_s: float, verifier) -> bool:
    if pred is None or not pred:
        return False
    a, b = as_plain_number(pred), as_plain_number(gold)
    if a is not None and b is not None:
        return a == b
    # Hand math-verify canonical numbers: it would read a thousands comma ("1,234") as a set {1, 234}.
    pred, gold = (format(a, "f") if a is not None else pred), (format(b, "f") if b is not None else gold)
    result = _get_pool().call(verifier, (pred, gold), timeout_s)
    if result is None:
        _count_timeout()
        return False
    return result


def is_correct(
    completion: str,
    ground_truth: str,
    *,
    timeout_s: float = 5.0,
    eos_markers: Sequence[str] = EOS_MARKERS,
) -> bool:
    """Whether the last boxed answer of ``completion`` equals ``ground_truth`` (spec §3.1; rules in the module doc).

    Never hangs and never raises on odd answers: a check that takes longer than ``timeout_s`` returns ``False``
    and is counted by :func:`timeout_count`. Safe to call from any thread and from any ``__main__``.

    Args:
        completion: Model output (may contain EOS markers and text after them).
        ground_truth: Reference answer, possibly GSM8K-style ``"... #### 1,234"``; ints/floats are accepted.
        timeout_s: Time limit of the math-verify check, in seconds (> 0).
        eos_markers: Strings that end the completion.

    Raises:
        ValueError: ``completion`` is not a str, ``ground_truth`` is not a str/number or holds no answer, or
            ``timeout_s`` is not positive. These are caller bugs, not wrong answers.
        VerifierUnavailableError: math-verify could not run (no worker starts, or two died on this check).
    """
    completion = _check_str("completion", completion)
    ground_truth = _check_str("ground_truth", ground_truth, allow_numbers=True)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    pred, gold = _extract_pair(completion, ground_truth, eos_markers)
    return _decide(pred, gold, timeout_s, _verify_in_worker)


def score_math(
    completions: Sequence[str],
    ground_truths: Sequence[str],
    *,
    timeout_s: float = 5.0,
    eos_markers: Sequence[str] = EOS_MARKERS,
) -> list[bool]:
    """:func:`is_correct` for many pairs; math-verify checks run in parallel on the worker pool.

    Args:
        completions: N model outputs.
        ground_truths: N reference answers (one per completion: repeat a prompt's answer for each sample).
        timeout_s: Time limit per check (> 0).
        eos_markers: Strings that end a completion.

    Returns:
        N booleans, in input order.

    Raises:
        ValueError: lengths differ, or an element is malformed (the message names its index).
        VerifierUnavailableError: math-verify could not run (see :func:`is_correct`).
    """
    if len(completions) != len(ground_truths):
        raise ValueError(f"score_math: {len(completions)} completions but {len(ground_truths)} ground truths")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    pairs = []
    for i, (c, g) in enumerate(zip(completions, ground_truths)):
        c = _check_str(f"completions[{i}]", c)
        g = _check_str(f"ground_truths[{i}]", g, allow_numbers=True)
        try:
            pairs.append(_extract_pair(c, g, eos_markers))
        except ValueError as e:
            raise ValueError(f"ground_truths[{i}]: {e}") from None
    if not pairs:
        return []
    workers = min(len(pairs), _get_pool().max_workers)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lrl-score-math") as ex:
        return list(ex.map(lambda p: _decide(p[0], p[1], timeout_s, _verify_in_worker), pairs))
