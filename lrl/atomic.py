"""Atomic writes: a reader (or a resumed run after a kill) sees the old file or directory or the new one, never a
half-written one. The one place the project writes files that must survive a crash: results (`atomic_write`),
training checkpoints (`atomic_torch_save`), HF checkpoint directories (`atomic_dir_write`), sharded checkpoint
directories written by several ranks (`replace_dir`) and the ``last`` link (`atomic_symlink`).

Everything is written beside its target (same directory, so the final ``os.replace`` is a rename on one
filesystem, never a copy), under a hidden name (``.<name>.…``) that the checkpoint listings skip, fsynced, renamed
into place, and the directory fsynced so the rename itself survives a power loss. Imports nothing of lrl (torch
only), so every layer can use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_via_temp(path: str | os.PathLike, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # by name: the file object names the temp file (crash tests read f.name)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600: give the result ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically (parents are created)."""
    payload = data.encode() if isinstance(data, str) else data
    _write_via_temp(path, lambda f: f.write(payload))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (parents are created)."""
    _write_via_temp(path, lambda f: torch.save(obj, f))


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the complete directory ``src`` to ``dst`` (same parent directory), replacing what is there.

    An existing ``dst`` is first renamed to a hidden ``.<name>.old-<pid>`` and deleted after the swap: a kill
    between the two renames leaves the old copy under the hidden name, never a mix of old and new files. A file or
    symlink at ``dst`` is replaced by the second rename itself."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    elif dst.is_symlink() or dst.exists():
        dst.unlink()
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_dir_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` on a fresh hidden directory beside ``path``, then swap it in (`replace_dir`): a crash
    or an exception in ``writer`` leaves the previous ``path`` as it was and no half directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        writer(tmp)
        # mkdtemp creates 0700 (and some writers 0600 files): give the result ordinary, shareable permissions
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (written relative to the link's directory), replacing a file, link or
    directory there: a new link under a hidden name renamed over the old one, so ``link`` always resolves."""
    link = Path(link)
    rel = os.path.relpath(Path(target).absolute(), link.parent.absolute())
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(rel, tmp)
    try:
        if link.is_dir() and not link.is_symlink():  # an old full copy (a sharded directory): rename cannot replace it
            replace_dir(tmp, link)
        else:
            os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
