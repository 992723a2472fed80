"""The math-verify worker process: ``python -m lrl.rewards.math_worker FD`` (started by `lrl.rewards.math`).

It is a fresh interpreter that imports only this module, so it never runs the caller's ``__main__`` (a script
without a main guard, a script read from stdin, ``python -c``, a notebook) the way a ``spawn`` pool does.
Protocol over the inherited socket ``FD`` (a `multiprocessing.connection.Connection`): the worker sends
``("ready", None)`` or ``("error", message)``, then answers each ``(fn, args)`` request with ``fn(*args)`` as a
bool (an exception inside ``fn`` means "not shown equal": ``False``) until EOF or ``None``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time


def verify_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (run inside the worker; math-verify's own timeouts off)."""
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _exit_with_parent(parent: int) -> None:
    """A worker busy on a hanging check never reads EOF: leave as soon as the parent is gone."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def serve(conn) -> None:
    """Warm the imports, say ready (or why not), then answer requests until EOF or ``None``."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning is expected here
    try:
        if verify_equal("1", "1") is not True:  # also warms sympy's caches before the first timed request
            raise RuntimeError("math-verify says 1 != 1")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises: never silent wrong answers
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        fn, args = request
        try:
            result = bool(fn(*args))
        except Exception:  # noqa: BLE001 - math-verify failing on an input means "not shown equal"
            result = False
        conn.send(result)


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it stops us by closing the socket
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(int(argv[0]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main(sys.argv[1:])
