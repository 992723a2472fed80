"""Measured memory peaks for checking the plan: live tensor bytes on CPU, the caching allocator's peak on CUDA.

On CPU there are no allocator statistics (tracemalloc does not see torch's allocations, RSS includes freed
malloc arenas and shared libraries). `LiveTensorBytes` counts what the plan models instead: every tensor storage
an operator returns is counted from its creation until the storage is freed (a weak reference on the storage's
Python object, which torch keeps alive exactly as long as the storage). Views and in-place results share an
input's storage and are not counted;
tensors that existed before the mode started (parameters, gradients kept between steps) are not counted, so a
peak is the extra memory of the measured code. Kernel workspaces that never become tensors are not seen.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Dispatch mode counting the bytes of the tensor storages created inside it that are still alive.

    Attributes: ``current`` (bytes alive now), ``peak`` (most bytes alive at once since the mode started).
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output sharing an input's storage (a view, an in-place op) allocated nothing: skipping it also keeps
        # views of tensors made before the mode (parameters) from being counted as new
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._live:
            return
        n = storage.nbytes()
        self._live[key] = (weakref.ref(storage, self._freed(key, n)), n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int, n: int):
        def callback(_ref):
            if self._live.pop(key, None) is not None:
                self.current -= n

        return callback


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Extra bytes at the peak of ``fn()`` over what was allocated before it: `LiveTensorBytes` on CPU,
    ``torch.cuda.max_memory_allocated`` on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensorBytes() as mode:
        fn()
    return mode.peak
