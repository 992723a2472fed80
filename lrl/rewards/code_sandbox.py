"""The process machinery behind `lrl.rewards.code`: environment probes, the launcher harness and one bounded run.

Holds the bubblewrap / pids-cgroup probes (`bwrap_available`, `sandbox_info`), the trusted launcher run by
``python -I -c`` and `_execute`, which runs it once in a fresh directory under rlimits (and bwrap when it works),
collects bounded output and kills and cleans up everything afterwards. What the sandbox does and does not protect
against is described in the `lrl.rewards.code` module docstring.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_RESULT_BYTES = 1 << 20  # cap on the function-mode result channel

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
