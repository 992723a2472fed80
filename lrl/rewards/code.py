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
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from lrl.rewards.math import EOS_MARKERS, cut_at_eos

logger = logging.getLogger(__name__)

TestMode = Literal["function", "stdio"]
StdioCase = tuple[str, str] | Mapping[str, str]

_RESULT_BYTES = 1 << 20  # cap on the function-mode result channel
_PY_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\r?\n(.*?)```", re.DOTALL)
_OPEN_PY_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)

# The launcher/harness run by `python -I -c` inside the sandbox. argv: mode, result fd (-1 in stdio mode).
_HARNESS = r"""
import json, os, sys
mode, fd = sys.argv[1], int(sys.argv[2])
pid = os.fork()
if pid:
    # Trusted launcher: the untrusted code is its child, so os.getppid() there is this process.
    if fd >= 0:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)
if mode == "stdio":
    os.execv(sys.executable, [sys.executable, "-I", "solution.py"])

def _main():
    payload = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.fdopen(fd, "w", buffering=1)
    nonce = payload.pop("nonce")

    def report(i, ok, why):
        out.write(json.dumps([nonce, i, ok, why[:500]]) + "\n")
        out.flush()

    def describe(e):
        text = str(e)
        return type(e).__name__ + (": " + text if text else "")

    try:
        with open("solution.py", encoding="utf-8") as f:
            code = compile(f.read(), "solution.py", "exec")
        ns = {"__name__": "__solution__", "__builtins__": __builtins__}
        exec(code, ns)
    except BaseException as e:  # SystemExit included: exiting before the tests is a failure
        report(-1, False, describe(e))
        os._exit(0)
    for i, test in enumerate(payload["tests"]):
        try:
            exec(compile(test, "<test %d>" % i, "exec"), ns)
        except BaseException as e:
            report(i, False, describe(e))
        else:
            report(i, True, "")
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os._exit(0)

_main()
"""


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


@dataclass
class _Run:
    stdout: bytes
    stderr: bytes
    results: bytes
    returncode: int | None
    timed_out: bool
    output_exceeded: bool


# ---------------------------------------------------------------------------------------------- environment probes
_probe_lock = threading.Lock()
_bwrap_ok: bool | None = None
_cgroup_base: str | None | bool = False  # False: not probed yet
_cap_warned = False
_run_ids = itertools.count()


def _tmp_paths_to_keep() -> list[str]:
    """Interpreter directories that live under /tmp (e.g. a venv in a temporary clone): the private /tmp would hide
    them, so they are bound back read-only."""
    keep = []
    for p in {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}:
        real = os.path.realpath(p)
        if real == "/tmp" or real.startswith("/tmp/"):
            keep += ["--ro-bind", real, real]
    return keep


def _bwrap_prefix(workdir: str) -> list[str]:
    return [
        shutil.which("bwrap") or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
        "--tmpfs", "/tmp", *_tmp_paths_to_keep(), "--bind", workdir, workdir, "--chdir", workdir, "--unshare-all",
        "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--",
    ]


def bwrap_available() -> bool:
    """Whether bubblewrap runs here (probed once, by running ``python -I -c pass`` under it)."""
    global _bwrap_ok
    with _probe_lock:
        if _bwrap_ok is None:
            _bwrap_ok, why = False, "bwrap is not installed (apt-get install -y bubblewrap)"
            if shutil.which("bwrap"):
                d = tempfile.mkdtemp(prefix="lrl-sbx-probe-")
                try:
                    cmd = [*_bwrap_prefix(d), sys.executable, "-I", "-c", "pass"]
                    p = subprocess.run(cmd, capture_output=True, timeout=30, env=_clean_env(d))
                    _bwrap_ok = p.returncode == 0
                    why = f"bwrap fails here (rc {p.returncode}): {p.stderr.decode(errors='replace').strip()[-300:]}"
                except (OSError, subprocess.TimeoutExpired) as e:
                    why = f"bwrap fails here: {e}"
                finally:
                    shutil.rmtree(d, ignore_errors=True)
            if not _bwrap_ok:
                msg = f"code sandbox: {why}; falling back to rlimits only (NOT isolated: see lrl.rewards.code)"
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return _bwrap_ok


def _pids_cgroup() -> str | None:
    """A writable ``pids`` cgroup directory under which per-run cgroups can be made (root only), else None."""
    global _cgroup_base
    with _probe_lock:
        if _cgroup_base is False:
            _cgroup_base = None
            if os.geteuid() == 0:
                for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
                    try:
                        if base == "/sys/fs/cgroup":  # cgroup v2: pids must be delegated to children
                            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                                if "pids" not in f.read().split():
                                    continue
                        probe = os.path.join(base, f"lrl-sbx-probe-{os.getpid()}")
                        os.mkdir(probe)
                        os.rmdir(probe)
                        _cgroup_base = base
                        break
                    except OSError:
                        continue
        return _cgroup_base


def sandbox_info() -> dict[str, object]:
    """What this machine's sandbox uses: ``{"bwrap": bool, "process_cap": "cgroup"|"rlimit"|"none"}``."""
    cap = "rlimit" if os.geteuid() != 0 else ("cgroup" if _pids_cgroup() else "none")
    return {"bwrap": bwrap_available(), "process_cap": cap}


def _user_task_count(uid: int) -> int:
    """Tasks (threads) owned by ``uid``: RLIMIT_NPROC counts these across the whole user."""
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended while we looked
                continue
    return n


def _clean_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------- one process
def _preexec(limits: tuple[tuple[int, int], ...], cgroup_procs: str | None) -> None:
    """Runs in the child between fork and exec: join the run's cgroup, then lower the rlimits."""
    if cgroup_procs is not None:
        fd = os.open(cgroup_procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    for res, value in limits:
        resource.setrlimit(res, (value, value))


def _rlimits(timeout_s: float, memory_bytes: int, file_bytes: int, nproc: int | None) -> tuple[tuple[int, int], ...]:
    wanted = [(resource.RLIMIT_CPU, int(timeout_s) + 2), (resource.RLIMIT_AS, memory_bytes),
              (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)]
    if nproc is not None:
        wanted.append((resource.RLIMIT_NPROC, nproc))
    out = []
    for res, value in wanted:
        hard = resource.getrlimit(res)[1]
        out.append((res, value if hard == resource.RLIM_INFINITY else min(value, hard)))  # cannot raise the hard limit
    return tuple(out)


def _make_cgroup(max_processes: int) -> str | None:
    base = _pids_cgroup()
    if base is None:
        return None
    path = os.path.join(base, f"lrl-sbx-{os.getpid()}-{next(_run_ids)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_processes))
    except OSError as e:
        logger.warning("code sandbox: cannot create cgroup %s (%s); process count not capped for this run", path, e)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return path


def _kill_everything(proc: subprocess.Popen, cgroup: str | None) -> None:
    """SIGKILL the run's process group (and everything in its cgroup), reap it and remove the cgroup."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
    proc.wait()
    if cgroup is None:
        return
    for _ in range(200):  # processes that left the group (setsid) are still in the cgroup
        try:
            with open(os.path.join(cgroup, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
            if not pids:
                os.rmdir(cgroup)
                return
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.01)
    logger.warning("code sandbox: could not remove cgroup %s", cgroup)


def _remove_tree(path: str) -> None:
    """Delete a run directory even if the program removed permissions from its contents."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _execute(files: Mapping[str, str], stdin_data: bytes, argv: list[str], *, timeout_s: float, memory_bytes: int,
             max_output_bytes: int, max_processes: int | None, bwrap: bool, tmp_root: str | None,
             result_channel: bool) -> _Run:
    """Run ``python -I -c HARNESS argv...`` in a fresh directory holding ``files``; collect bounded output."""
    global _cap_warned
    workdir = tempfile.mkdtemp(prefix="lrl-sbx-", dir=tmp_root)
    cgroup, proc, fds = None, None, []
    try:
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        stdin = tempfile.TemporaryFile(dir=workdir)  # unlinked: the program cannot open it by name
        stdin.write(stdin_data)
        stdin.seek(0)
        nproc = None
        if max_processes is not None:
            cgroup = _make_cgroup(max_processes)
            if os.geteuid() != 0:
                nproc = _user_task_count(os.getuid()) + max_processes
            elif cgroup is None and not _cap_warned:
                _cap_warned = True
                warnings.warn("code sandbox: running as root without a writable pids cgroup, so the process count "
                              "is not capped (fork bombs are stopped only by the time limit)", RuntimeWarning,
                              stacklevel=4)
        limits = _rlimits(timeout_s, memory_bytes, 16 << 20, nproc)
        r_fd = w_fd = -1
        if result_channel:
            r_fd, w_fd = os.pipe()
            fds += [r_fd, w_fd]
        cmd = ([*_bwrap_prefix(workdir)] if bwrap else []) + [sys.executable, "-I", "-c", _HARNESS, *argv, str(w_fd)]
        cgroup_procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None
        with stdin:
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=_clean_env(workdir), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(w_fd,) if result_channel else (), start_new_session=True, close_fds=True,
                preexec_fn=functools.partial(_preexec, limits, cgroup_procs),
            )
        if result_channel:
            os.close(w_fd)
            fds.remove(w_fd)
        return _collect(proc, r_fd, timeout_s, max_output_bytes)
    finally:
        if proc is not None:
            _kill_everything(proc, cgroup)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        elif cgroup is not None:
            os.rmdir(cgroup)
        for fd in fds:
            os.close(fd)
        _remove_tree(workdir)


def _collect(proc: subprocess.Popen, result_fd: int, timeout_s: float, max_output_bytes: int) -> _Run:
    """Read stdout, stderr and the result pipe until EOF, the deadline or the output cap."""
    deadline = time.monotonic() + timeout_s
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    if result_fd >= 0:
        bufs[result_fd] = bytearray()
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    timed_out = exceeded = False
    try:
        # Until every pipe is closed: results written just before the harness exits are never lost. Leftover
        # descendants holding a pipe keep the run going until the deadline (then everything is killed).
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            for key, _ in sel.select(timeout=deadline - now):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                bufs[key.fd] += data
            if len(bufs[proc.stdout.fileno()]) + len(bufs[proc.stderr.fileno()]) > max_output_bytes:
                exceeded = True
                break
            if result_fd >= 0 and len(bufs[result_fd]) > _RESULT_BYTES:
                exceeded = True
                break
    finally:
        sel.close()
    if not exceeded and not timed_out:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    return _Run(
        stdout=bytes(bufs[proc.stdout.fileno()][:max_output_bytes]),
        stderr=bytes(bufs[proc.stderr.fileno()][-4096:]),
        results=bytes(bufs.get(result_fd, b"")[:_RESULT_BYTES]),
        returncode=None if timed_out else proc.poll(),
        timed_out=timed_out, output_exceeded=exceeded,
    )


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
