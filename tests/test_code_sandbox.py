"""The code sandbox (lrl.rewards.code): outcomes, failure reasons and containment, in bwrap and fallback mode."""

from __future__ import annotations

import os
import time
import warnings

import pytest

from lrl.rewards import code_sandbox as sandbox  # the probe state (_bwrap_ok) lives there
from lrl.rewards.code import CodeResult, extract_code, run_tests, sandbox_info, score_code

HAS_BWRAP = sandbox.bwrap_available()
MODES = [
    pytest.param(True, id="bwrap", marks=pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not usable here")),
    pytest.param(False, id="fallback"),
]

ADD = "def add(a, b):\n    return a + b\n"


def _processes_under(path) -> list[int]:
    """Pids whose working directory is inside ``path`` (sandbox leftovers)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.readlink(f"/proc/{entry.name}/cwd").startswith(str(path)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("bwrap", MODES)
def test_correct_program_passes(bwrap):
    r = run_tests(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], 5.0, use_bwrap=bwrap)
    assert (r.passed, r.total, r.pass_rate, r.all_passed, r.failures) == (2, 2, 1.0, True, [])
    assert list(r) == [True, True] and len(r) == 2
    assert r.sandbox == ("bwrap" if bwrap else "rlimits")


@pytest.mark.parametrize("bwrap", MODES)
def test_wrong_assert_fails_with_reason(bwrap):
    r = run_tests(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5, 'two plus two'", "add(1)"], 5.0,
                  use_bwrap=bwrap)
    assert r.outcomes == [True, False, False]
    assert r.passed == 1 and r.pass_rate == pytest.approx(1 / 3) and not r.all_passed
    assert r.failures[0] == "test 1: AssertionError: two plus two"
    assert r.failures[1].startswith("test 2: TypeError")


@pytest.mark.parametrize("bwrap", MODES)
def test_syntax_error_fails_every_test(bwrap):
    r = run_tests("def add(a, b) return a + b", ["assert add(1, 2) == 3", "assert True"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [False, False]
    assert all("SyntaxError" in f for f in r.failures) and len(r.failures) == 2


@pytest.mark.parametrize("bwrap", MODES)
@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exit_before_tests_counts_as_failure(bwrap, exit_call):
    # The released code counted SystemExit as a pass; here leaving before the asserts fails them all.
    r = run_tests(ADD + exit_call, ["assert add(1, 2) == 3", "assert True"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [False, False]


@pytest.mark.parametrize("bwrap", MODES)
def test_exit_inside_a_test_fails_only_that_test(bwrap):
    program = ADD + "import sys\ndef bye():\n    sys.exit(0)\n"
    r = run_tests(program, ["assert add(1, 2) == 3", "bye()", "assert add(0, 0) == 0"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [True, False, True]
    assert r.failures == ["test 1: SystemExit: 0"]


@pytest.mark.parametrize("bwrap", MODES)
def test_infinite_loop_is_killed_by_the_timeout(bwrap):
    start = time.monotonic()
    r = run_tests(ADD + "def spin():\n    while True:\n        pass\n",
                  ["assert add(1, 1) == 2", "spin()", "assert True"], 1.0, use_bwrap=bwrap)
    assert time.monotonic() - start < 3.0
    assert r.timed_out and r.outcomes == [True, False, False]  # results before the hang are kept
    assert "timed out after 1s" in r.failures[0]


@pytest.mark.parametrize("bwrap", MODES)
def test_fork_bomb_is_contained(bwrap, tmp_path):
    if sandbox_info()["process_cap"] == "none":
        pytest.skip("no process cap here (root without a writable pids cgroup): an uncapped fork bomb is unsafe")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_tests(bomb, ["assert True"], 1.0, use_bwrap=bwrap, tmp_root=str(tmp_path))
    assert time.monotonic() - start < 5.0
    assert r.outcomes == [False] and r.timed_out
    time.sleep(0.1)
    assert _processes_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bwrap", MODES)
def test_leftover_children_are_killed_without_a_process_cap(bwrap, tmp_path):
    # Bounded version of the fork bomb with the cap disabled: the process-group kill alone must clean up.
    program = (
        "import os, time\n"
        "for _ in range(20):\n"
        "    if os.fork() == 0:\n"
        "        os.closerange(0, 1024)\n"  # do not hold the output pipes: the run ends when the harness does
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
    )
    r = run_tests(program, ["assert True"], 5.0, use_bwrap=bwrap, max_processes=None, tmp_root=str(tmp_path))
    assert r.outcomes == [True] and r.elapsed_s < 3.0
    time.sleep(0.1)
    assert _processes_under(tmp_path) == []


@pytest.mark.parametrize("bwrap", MODES)
def test_memory_bomb_fails_without_hurting_the_scorer(bwrap):
    r = run_tests("blob = bytearray(4 * 2**30)\n", ["assert len(blob) > 0"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [False] and "MemoryError" in r.failures[0]
    r = run_tests("chunks = []\nwhile True:\n    chunks.append(bytes(2**28))\n", ["assert True"], 5.0,
                  use_bwrap=bwrap)
    assert r.outcomes == [False] and "MemoryError" in r.failures[0]


@pytest.mark.parametrize("bwrap", MODES)
def test_huge_output_is_bounded(bwrap):
    start = time.monotonic()
    r = run_tests("while True:\n    print('x' * 4096)\n", ["assert True"], 5.0, use_bwrap=bwrap,
                  max_output_bytes=64 * 1024)
    assert time.monotonic() - start < 3.0  # killed at the cap, not at the timeout
    assert r.outcomes == [False] and "output limit exceeded" in r.failures[0] and not r.timed_out
    r = run_tests("while True:\n    print('x' * 4096)\n", [("", "x")], 5.0, mode="stdio", use_bwrap=bwrap,
                  max_output_bytes=64 * 1024)
    assert r.outcomes == [False] and "output limit exceeded" in r.failures[0]


@pytest.mark.parametrize("bwrap", MODES)
def test_killing_the_parent_does_not_kill_the_scorer(bwrap):
    # The untrusted code's parent is the sandbox launcher; this test process must survive (reaching the asserts).
    r = run_tests("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", ["assert True"], 5.0,
                  use_bwrap=bwrap)
    assert isinstance(r, CodeResult) and r.total == 1
    r = run_tests("import os, signal\nos.killpg(0, signal.SIGKILL)\n", ["assert True"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [False]


@pytest.mark.parametrize("bwrap", MODES)
def test_forged_results_are_ignored(bwrap):
    # A program that writes pass records to every fd it can find cannot turn a failing assert into a pass.
    forge = (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        os.write(fd, b'[\"guess\", 0, true, \"\"]\\n')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = run_tests(forge, ["assert False"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [False]


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not usable here")
def test_bwrap_root_is_read_only_and_tmp_private(tmp_path):
    outside = tmp_path / "escape.txt"  # under the host /tmp, which the sandbox replaces with a private tmpfs
    program = (
        f"def write_tmp():\n    open({str(outside)!r}, 'w').write('x')\n"
        "def write_root():\n    open('/usr/escape.txt', 'w').write('x')\n"
        "def write_cwd():\n    open('ok.txt', 'w').write('x')\n    return True\n"
    )
    r = run_tests(program, ["write_tmp()", "write_root()", "assert write_cwd()"], 5.0, use_bwrap=True)
    assert r.outcomes == [False, False, True]
    assert "Read-only file system" in r.failures[1]
    assert not outside.exists() and not os.path.exists("/usr/escape.txt")


@pytest.mark.parametrize("bwrap", MODES)
def test_runs_in_a_fresh_directory_that_is_removed(bwrap, tmp_path):
    # Fallback mode cannot stop absolute-path writes (documented); what holds in both modes: the working
    # directory is a fresh directory under tmp_root, relative writes land there, and it is deleted afterwards.
    program = "import os\nopen('out.txt', 'w').write('x')\nHERE = os.getcwd()\n"
    tests = [f"assert HERE.startswith({str(tmp_path)!r})",
             "assert sorted(os.listdir('.')) == ['out.txt', 'solution.py']"]
    r = run_tests(program, tests, 5.0, use_bwrap=bwrap, tmp_root=str(tmp_path))
    assert r.outcomes == [True, True], r.failures
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bwrap", MODES)
def test_environment_is_scrubbed(bwrap, monkeypatch):
    monkeypatch.setenv("LRL_SECRET_TOKEN", "hunter2")
    r = run_tests("import os\n", ["assert 'LRL_SECRET_TOKEN' not in os.environ"], 5.0, use_bwrap=bwrap)
    assert r.outcomes == [True]


@pytest.mark.parametrize("bwrap", MODES)
def test_stdio_tests_pass_and_fail(bwrap):
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    cases = [("1 2\n", "3\n"), {"input": "2 2", "output": "  5  "}, ("10 5", "15")]
    r = run_tests(program, cases, 5.0, mode="stdio", use_bwrap=bwrap)
    assert r.outcomes == [True, False, True]
    assert r.failures == ["test 1: wrong output: expected '5', got '4'"]


@pytest.mark.parametrize("bwrap", MODES)
def test_stdio_whitespace_runtime_error_and_timeout(bwrap):
    program = "n = int(input())\nprint(*range(n))\nprint('done')\n"
    r = run_tests(program, [("3", "0 1 2\n\ndone"), ("x", "")], 5.0, mode="stdio", use_bwrap=bwrap)
    assert r.outcomes == [True, False] and "ValueError" in r.failures[0]  # exit status 1 fails
    r = run_tests("while True:\n    pass\n", [("", "")], 1.0, mode="stdio", use_bwrap=bwrap)
    assert r.outcomes == [False] and r.timed_out


def test_score_code_runs_many_in_order():
    programs = [ADD, "def add(a, b):\n    return a - b\n", "syntax error here", ADD]
    tests = [["assert add(1, 2) == 3"]] * 4
    results = score_code(programs, tests, 5.0, max_workers=2)
    assert [r.passed for r in results] == [1, 0, 0, 1]
    stdio = score_code(["print(input()[::-1])"], [[("abc", "cba")]], 5.0, mode="stdio")
    assert stdio[0].all_passed
    with pytest.raises(ValueError, match="2 programs but 1 test lists"):
        score_code([ADD, ADD], [["assert True"]])


def test_fallback_can_be_forced_by_env(monkeypatch):
    monkeypatch.setenv("LRL_SANDBOX_BWRAP", "0")
    assert run_tests(ADD, ["assert add(1, 2) == 3"]).sandbox == "rlimits"


def test_missing_bwrap_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap_ok", None)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="falling back to rlimits"):
        r = run_tests(ADD, ["assert add(1, 2) == 3"])
    assert r.sandbox == "rlimits" and r.all_passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_tests(ADD, ["assert add(1, 2) == 3"])  # probed once: no second warning
    with pytest.raises(RuntimeError, match="bubblewrap does not work"):
        run_tests(ADD, ["assert True"], use_bwrap=True)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="program must be a str"):
        run_tests(None, ["assert True"])
    with pytest.raises(ValueError, match="tests must be a non-empty list"):
        run_tests(ADD, [])
    with pytest.raises(ValueError, match="tests must be a non-empty list"):
        run_tests(ADD, "assert True")
    with pytest.raises(ValueError, match=r"tests\[0\]: function tests must be str"):
        run_tests(ADD, [("1", "2")])
    with pytest.raises(ValueError, match=r"tests\[1\]: stdio tests must be"):
        run_tests(ADD, [("1", "2"), "3"], mode="stdio")
    with pytest.raises(ValueError, match="mode must be"):
        run_tests(ADD, ["assert True"], mode="shell")
    with pytest.raises(ValueError, match="timeout_s"):
        run_tests(ADD, ["assert True"], 0)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```python\na = 1\n```\ntext\n```python\nb = 2\n```", "b = 2\n"),  # last python block wins
        ("```py\nc = 3\n```\n```\nplain\n```", "c = 3\n"),  # a python block beats a later plain block
        ("```\nx = 1\n```", "x = 1\n"),  # no python block: last fenced block
        ("def g():\n    pass", "def g():\n    pass"),  # no fence: the text itself
        ("```python\ndef h():\n    return 2", "def h():\n    return 2"),  # unclosed fence (truncated output)
        ("```python\nk = 1\n```<|im_end|>```python\nk = 2\n```", "k = 1\n"),  # text after EOS ignored
    ],
)
def test_extract_code(completion, expected):
    assert extract_code(completion) == expected


def test_extract_code_rejects_non_strings():
    with pytest.raises(ValueError, match="completion must be a str"):
        extract_code(None)
