"""`lrl.atomic`: every write leaves the old content or the new one, never half of it and no temp files."""

from __future__ import annotations

import os

import pytest
import torch

from lrl.atomic import atomic_dir_write, atomic_symlink, atomic_torch_save, atomic_write


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_bytes_and_text_and_failure(tmp_path, monkeypatch):
    f = tmp_path / "sub" / "out.json"
    atomic_write(f, b"old")
    atomic_write(f, "néw")
    assert f.read_text() == "néw" and oct(f.stat().st_mode & 0o777) == "0o644"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write(f, b"lost")
    monkeypatch.undo()
    assert f.read_text() == "néw" and _listing(f.parent) == ["out.json"]


def test_atomic_torch_save_roundtrip(tmp_path):
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "a.ckpt")
    assert torch.equal(torch.load(tmp_path / "a.ckpt")["x"], torch.arange(3))


def test_atomic_dir_write_failure_keeps_the_old_directory(tmp_path):
    d = tmp_path / "model"
    atomic_dir_write(d, lambda tmp: (tmp / "w.bin").write_bytes(b"v1"))

    def half(tmp):
        (tmp / "w.bin").write_bytes(b"v2-half")
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        atomic_dir_write(d, half)
    assert (d / "w.bin").read_bytes() == b"v1" and _listing(tmp_path) == ["model"]
    atomic_dir_write(d, lambda tmp: (tmp / "w2.bin").write_bytes(b"v3"))
    assert _listing(d) == ["w2.bin"] and _listing(tmp_path) == ["model"]


def test_atomic_symlink_replaces_file_link_and_directory(tmp_path):
    (tmp_path / "a.ckpt").write_text("a")
    (tmp_path / "b.ckpt").write_text("b")
    last = tmp_path / "last.ckpt"
    last.mkdir()  # an old full copy of a sharded checkpoint
    (last / "meta.pt").write_text("old")
    atomic_symlink(tmp_path / "a.ckpt", last)
    assert last.is_symlink() and last.read_text() == "a" and os.readlink(last) == "a.ckpt"
    atomic_symlink(tmp_path / "b.ckpt", last)
    assert last.read_text() == "b" and _listing(tmp_path) == ["a.ckpt", "b.ckpt", "last.ckpt"]
