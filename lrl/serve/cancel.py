"""Cancel the generation of a `/generate` client that went away (`lrl serve`).

The native engine decodes a request in a worker thread, under the server's lock; a client that disconnects would
otherwise keep it busy to the end and every later request would wait. `CancelHook` wraps the engine model's
``forward_chunk`` (the prefill and every eager denoising / store forward go through it) so that the running
generation stops with `GenerationCancelled` at its next forward once its request's event is set;
`run_cancellable` sets the event when Starlette reports the client disconnected. With CUDA graphs the replayed
decode forwards bypass ``forward_chunk``: the generation then stops at its next prefill chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any


class GenerationCancelled(Exception):  # noqa: N818 - a signal, not an error of the server
    """The client of the running generation went away."""


class CancelHook:
    """Installed once on the engine's model; `watching` names the event of the generation running now."""

    def __init__(self, lm) -> None:
        self._event: threading.Event | None = None
        self.cancelled = 0  # generations stopped early (reported by /get_server_info)
        original = lm.forward_chunk

        def forward_chunk(*args, **kwargs):
            event = self._event
            if event is not None and event.is_set():
                raise GenerationCancelled
            return original(*args, **kwargs)

        lm.forward_chunk = forward_chunk  # instance attribute: shadows the method for this model only

    @contextlib.contextmanager
    def watching(self, event: threading.Event | None):
        if event is not None and event.is_set():  # gone while it waited for the lock: do not start
            self.cancelled += 1
            raise GenerationCancelled
        self._event = event
        try:
            yield
        except GenerationCancelled:
            self.cancelled += 1
            raise
        finally:
            self._event = None


async def run_cancellable(request, fn: Callable[..., Any], *args, poll_s: float = 0.05) -> Any:
    """``fn(*args, cancel=event)`` in a worker thread; the event is set as soon as ``request``'s client
    disconnects. Returns ``fn``'s result; a cancelled generation raises `GenerationCancelled` (nobody reads it)."""
    event = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, cancel=event))
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            event.set()
            break
    return await task
