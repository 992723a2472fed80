"""Math final-answer correctness (lrl.rewards.math, spec §3.1): extraction rules, equivalences, timeouts, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lrl.rewards import math as mr
from lrl.rewards.math import is_correct, last_boxed, score_math

CASES = [
    # (completion, ground_truth, expected)
    (r"The answer is \boxed{42}.", "42", True),
    (r"The answer is \boxed{41}.", "42", False),  # wrong answer
    ("The answer is 42.", "42", False),  # no box: deliberately wrong even though math-verify would parse 42
    (r"\boxed{}", "0", False),  # empty box
    (r"So \boxed{\frac{1}{2}}", "1/2", True),  # nested braces inside the box
    (r"So \boxed{\frac{1}{2}}", r"\frac{1}{3}", False),
    (r"First \boxed{3}, no wait, \boxed{4}", "4", True),  # several boxes: the last wins
    (r"First \boxed{3}, no wait, \boxed{4}", "3", False),
    (r"\boxed{5}<|im_end|> junk \boxed{6}", "5", True),  # text after EOS ignored
    (r"\boxed{5}<|endoftext|>\boxed{6}", "6", False),
    (r"\boxed{5}</s>\boxed{6}", "6", False),
    (r"\boxed{1234}", "Natalia sold 48 clips ... #### 1,234", True),  # GSM8K '#### N' with thousands comma
    (r"\boxed{1,234}", "#### 1234", True),  # thousands comma in the prediction
    (r"\boxed{1{,}234}", "1234", True),  # LaTeX thousands separator
    (r"\boxed{1233}", "#### 1,234", False),
    (r"\boxed{1234 \text{ clips}}", "#### 1,234", True),  # math-verify path must not read 1,234 as a set
    (r"\boxed{-7}", "-7", True),  # negative numbers
    (r"\boxed{7}", "-7", False),  # sign matters
    (r"\boxed{-0.5}", r"-\frac{1}{2}", True),
    (r"\boxed{\frac12}", "0.5", True),  # \frac12 shorthand vs decimal
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True),  # equivalent expressions
    (r"\boxed{x^2+2x+2}", "(x+1)^2", False),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", True),
    (r"\boxed{\$18}", "18", True),  # dollar sign
    (r"\boxed{18.}", "18", True),  # trailing period
    (r"\boxed{18.00}", "18", True),  # decimals compare by value
    (r"\boxed{18.01}", "18", False),
    (r"\boxed{50\%}", "50", True),  # percent sign handled by math-verify
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),  # escaped braces inside the box are not grouping braces
    (r"\boxed{[1,2)}", "[1,2)", True),  # intervals
    (r"\boxed{\pi}", "3.14159", False),  # no loose numeric rounding
    (r"\boxed {12}", "12", True),  # whitespace before the brace
    (r"\boxed{12", "12", False),  # unclosed last box (truncated output) is no answer
    (r"\boxed{3} and later \boxed{4", "3", False),  # ...even when an earlier box is complete
    (r"\boxed 12", "12", False),  # brace-less \boxed is not recognised (documented)
    (r"\boxed{\text{(B)}}", "B", True),
    (r"answer: \boxed{7}", 7, True),  # integer ground truth accepted
    (r"\boxed{The final answer is \boxed{9}}", "9", True),  # box in a box: the last opening is the inner one
]


@pytest.mark.parametrize("completion, ground_truth, expected", CASES)
def test_is_correct(completion, ground_truth, expected):
    assert is_correct(completion, ground_truth) is expected


def test_score_math_matches_is_correct_in_order():
    comps = [c for c, _, _ in CASES]
    truths = [g for _, g, _ in CASES]
    assert score_math(comps, truths) == [e for _, _, e in CASES]
    assert score_math([], []) == []


def test_last_boxed_extraction():
    assert last_boxed(r"a \boxed{\frac{a}{b}} b") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{1} \boxed{ 2 }") == "2"
    assert last_boxed("nothing") is None
    assert last_boxed(r"\boxed{\}") is None  # the only closing brace is escaped


def test_is_correct_from_a_worker_thread():
    # math-verify's own timeout uses signal.alarm, which raises outside the main thread; ours must not.
    results, errors = [], []

    def work():
        try:
            results.append(is_correct(r"\boxed{x^2+2x+1}", "(x+1)^2"))
            results.append(is_correct(r"\boxed{\frac{1}{2}}", "0.5"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert not errors and results == [True, True]


def test_pathological_input_times_out_to_false():
    # 10^(10^10) makes sympy evaluate a gigantic power; math-verify would hang without an external limit.
    mr.reset_timeout_count()
    start = time.monotonic()
    assert is_correct(r"\boxed{10^{10^{10}}}", "1", timeout_s=1.0) is False
    assert time.monotonic() - start < 4.0
    assert mr.timeout_count() == 1
    # The killed worker is replaced: later checks still work, also in a batch next to a hanging one.
    got = score_math([r"\boxed{10^{10^{10}}}", r"\boxed{\frac{1}{2}}", r"\boxed{3}"], ["1", "0.5", "3"],
                     timeout_s=1.0)
    assert got == [False, True, True]
    assert mr.reset_timeout_count() == 2 and mr.timeout_count() == 0


def _sleepy_verifier(pred: str, gold: str) -> bool:
    time.sleep(30)
    return True


def test_slow_verifier_is_killed():
    pool = mr.VerifierPool(1)
    try:
        start = time.monotonic()
        assert pool.call(_sleepy_verifier, ("1", "1"), 0.5) is None
        assert time.monotonic() - start < 5.0  # worker start-up (~1 s, not timed) + 0.5 s + kill
        assert pool.call(mr._verify_in_worker, (r"\frac{1}{2}", "0.5"), 10.0) is True  # replaced worker
        idle = pool._idle[0]  # a worker that dies while idle is replaced without failing the next check
        idle.proc.kill()
        idle.proc.wait()
        assert pool.call(mr._verify_in_worker, ("x^2+2x+1", "(x+1)^2"), 10.0) is True
    finally:
        pool.close()


def test_malformed_input_raises_value_error():
    with pytest.raises(ValueError, match="completion must be a str"):
        is_correct(None, "1")
    with pytest.raises(ValueError, match="completion must be a str"):
        is_correct(b"\\boxed{1}", "1")
    with pytest.raises(ValueError, match="ground_truth must be a str"):
        is_correct(r"\boxed{1}", None)
    with pytest.raises(ValueError, match="ground_truth has no answer"):
        is_correct(r"\boxed{1}", "reasoning #### ")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        is_correct(r"\boxed{1}", "1", timeout_s=0)
    with pytest.raises(ValueError, match=r"ground_truths\[1\] must be a str"):
        score_math(["a", "b"], ["1", None])
    with pytest.raises(ValueError, match="2 completions but 1 ground truths"):
        score_math(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        mr.set_max_workers(0)


# --------------------------------------------------------------------------- callers with any kind of __main__
ROOT = Path(__file__).resolve().parents[1]
# needs math-verify (no plain-number fast path); the unguarded body appends one row per execution of __main__
_CALLER = textwrap.dedent("""
    import sys
    from lrl.rewards.math import is_correct
    with open(sys.argv[-1] if len(sys.argv) > 1 else ROWS, "a") as f:
        f.write("row\\n")
    def check():
        print("RESULT", is_correct(r"\\boxed{\\frac{1}{2}}", "0.5"), is_correct(r"\\boxed{x^2+2x+2}", "(x+1)^2"))
    GUARD
""")


@pytest.mark.parametrize("how", ["guarded", "unguarded", "stdin", "dash_c"])
def test_same_answers_whatever_the_callers_main(how, tmp_path):
    # spawn re-imported __main__: from stdin every math-verify answer was False, unguarded bodies ran per worker
    rows = tmp_path / "rows.txt"
    guard = 'if __name__ == "__main__":\n    check()' if how == "guarded" else "check()"
    code = _CALLER.replace("ROWS", repr(str(rows))).replace("GUARD", guard)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = tmp_path / "caller.py"
    script.write_text(code)
    cmd = {"guarded": [sys.executable, str(script)], "unguarded": [sys.executable, str(script)],
           "stdin": [sys.executable, "-"], "dash_c": [sys.executable, "-c", code]}[how]
    proc = subprocess.run(cmd, input=code if how == "stdin" else None, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert rows.read_text() == "row\n"  # the caller's body ran once, never in a worker


def test_worker_that_cannot_start_raises_instead_of_scoring_false(monkeypatch, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "math_verify.py").write_text("raise ImportError('math_verify is broken')\n")
    monkeypatch.setattr(mr, "_worker_env", lambda: dict(os.environ, PYTHONPATH=f"{broken}{os.pathsep}{ROOT}"))
    pool = mr.VerifierPool(1)
    with pytest.raises(mr.VerifierUnavailableError, match="math_verify is broken"):
        pool.call(mr._verify_in_worker, (r"\frac{1}{2}", "0.5"), 10.0)
    monkeypatch.setattr(mr.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(mr.VerifierUnavailableError, match="could not be started"):
        pool.call(mr._verify_in_worker, (r"\frac{1}{2}", "0.5"), 10.0)
    assert pool._live == 0  # failed starts do not leak slots
    mr.shutdown()  # the module-level pool: is_correct raises too instead of returning False
    with pytest.raises(mr.VerifierUnavailableError):
        is_correct(r"\boxed{\frac{1}{2}}", "0.5")
    mr.shutdown()
    assert is_correct(r"\boxed{2}", "2.0") is True  # the plain-number fast path needs no worker


def _die(pred: str, gold: str) -> bool:
    os._exit(3)


def _die_once(marker: str, gold: str) -> bool:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return True


def test_worker_death_is_retried_once_then_raises(tmp_path):
    pool = mr.VerifierPool(1)
    try:
        assert pool.call(_die_once, (str(tmp_path / "died"), "x"), 30.0) is True  # a fresh worker answered
        with pytest.raises(mr.VerifierUnavailableError, match="died twice"):
            pool.call(_die, ("1", "1"), 30.0)
        assert pool._live == 0
        with pytest.raises(ValueError, match="__main__"):
            pool.call(type("F", (), {"__module__": "__main__", "__call__": lambda *a: True})(), ("1", "1"), 1.0)
    finally:
        pool.close()
