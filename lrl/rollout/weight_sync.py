"""Trainer-side weight-sync helpers for rollout servers (SGLang 0.5.23 or ``lrl serve``).

Two transports, both without importing sglang in the trainer (see docs/sglang.md):

* **disk**: write an HF checkpoint directory (safetensors, sharded when large) into a directory the servers can
  read (ideally a RAM-backed tmpfs such as /dev/shm on the same node), then ask each server to
  ``/update_weights_from_disk``. `write_hf_checkpoint` writes a named-tensor mapping next to the non-weight files
  (config.json, tokenizer, remote code) of a template checkpoint; `DiskCheckpointStore` names, rotates and removes
  the versions.
* **distributed**: the trainer is rank 0 of a dedicated process group that every server joins as ranks
  ``1..n`` (``/init_weights_update_group``); each update broadcasts the tensors from rank 0 while the servers
  receive them inside ``/update_weights_from_distributed``. `init_custom_process_group` builds that group the way
  SGLang does on its side (TCP rendezvous, a store prefixed by the group name, a group outside the default world),
  so it works whether or not the trainer already has a default process group (Lightning DDP).
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from lrl.atomic import atomic_dir_write

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling SGLang's distributed update expects)."""
    return str(dtype).removeprefix("torch.")


def iter_named_tensors(
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    items = weights.items() if isinstance(weights, Mapping) else weights
    for name, tensor in items:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weights must be (name: str, tensor: Tensor) pairs, got ({type(name)}, {type(tensor)})")
        yield name, tensor


def _to_cpu(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = tensor.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    # clone: safetensors refuses tensors that share storage (tied embeddings)
    return t.to("cpu").contiguous().clone()


def write_hf_checkpoint(
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    template_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 << 30,
) -> Path:
    """Write ``weights`` (HF parameter names) as a checkpoint directory, atomically.

    Every non-weight file of ``template_dir`` (config.json, tokenizer files, generation config, remote-code .py)
    is copied so the directory is a complete checkpoint that SGLang can load. Tensors are written as safetensors,
    split into shards of at most ``max_shard_bytes`` with a ``model.safetensors.index.json`` when needed.

    Args:
        weights: named tensors (any device).
        path: destination directory (replaced if it exists).
        template_dir: the checkpoint the servers were launched from.
        dtype: cast floating tensors to this dtype first (e.g. bfloat16 to halve the bytes); None keeps them.
        max_shard_bytes: shard size limit.
    """
    from safetensors.torch import save_file

    template = Path(template_dir)
    if not (template / "config.json").is_file():
        raise FileNotFoundError(f"weight sync template {template} is not a checkpoint directory (no config.json)")
    dst = Path(path)

    def write(tmp: Path) -> None:
        for f in template.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEX_FILES:
                shutil.copy2(f, tmp / f.name)
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        total = 0
        seen: set[str] = set()
        for name, tensor in iter_named_tensors(weights):
            if name in seen:
                raise ValueError(f"write_hf_checkpoint: duplicate tensor name {name!r}")
            seen.add(name)
            t = _to_cpu(tensor, dtype)
            nbytes = t.numel() * t.element_size()
            if shards[-1] and sizes[-1] + nbytes > max_shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = t
            sizes[-1] += nbytes
            total += nbytes
        if not shards[0]:
            raise ValueError("write_hf_checkpoint: no tensors to write")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    atomic_dir_write(dst, write)
    return dst


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files of a checkpoint directory (what a server loads on a disk update), but
    not a dUltra planner head's file (its names are the head's own; `lrl serve` loads it as ``planner.*``)."""
    from safetensors.torch import load_file

    from lrl.models.planner import PLANNER_FILE

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    files = sorted(f for f in root.glob("*.safetensors") if f.name != PLANNER_FILE)
    if not files:
        raise FileNotFoundError(f"{root} holds no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


class DiskCheckpointStore:
    """Versioned checkpoint directories under ``root`` (``weights-v<version>``), keeping the newest ``keep``.

    Args:
        root: shared directory the servers can read (created if missing).
        keep: how many versions to keep on disk (>= 1); older ones are removed by `prune`.
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"DiskCheckpointStore.keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._written: list[Path] = []

    def path_for(self, version: int | str) -> Path:
        return self.root / f"weights-v{version}"

    def record(self, path: Path) -> None:
        if path in self._written:
            self._written.remove(path)
        self._written.append(path)

    def prune(self) -> None:
        """Delete the versions this store wrote beyond the newest ``keep`` (call once servers have loaded)."""
        while len(self._written) > self.keep:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- distributed
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for the rank-0 rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("localhost", "") else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_custom_process_group(
    *,
    backend: str,
    init_method: str,
    world_size: int,
    rank: int,
    group_name: str,
    timeout_s: float = 600.0,
):
    """A process group outside the default world, built like SGLang's ``init_custom_process_group``.

    Both sides must agree on the rendezvous (``tcp://host:port``; rank 0 hosts the store), the store prefix (the
    group name) and the backend, or they never meet. Blocks until all ``world_size`` ranks joined or ``timeout_s``.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options_kw = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        timeout=timeout,
        **{options_kw: None},
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_process_group(pg) -> None:
    """Best effort: tear a custom group down (never raises)."""
    try:
        torch.distributed.destroy_process_group(pg)
    except Exception:
        pass


def bucket_tensors(
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Split named tensors into buckets of about ``bucket_bytes`` (a tensor larger than that is its own bucket)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in iter_named_tensors(weights):
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def bucket_metadata(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """The ``names`` / ``dtypes`` / ``shapes`` fields of ``/update_weights_from_distributed`` for one bucket."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }


def broadcast_bucket(pg, tensors: list[torch.Tensor]) -> list:
    """Start one broadcast per tensor from rank 0, in order (the receiver posts them in the same order)."""
    return [torch.distributed.broadcast(t, src=0, group=pg, async_op=True) for t in tensors]
