"""scripts/export_policy.py: bad input fails early with one line and writes nothing (the happy path, a planner
run's last.ckpt exported and reloaded with its head, is in tests/test_planner.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path):
    from export_policy import main

    with pytest.raises(SystemExit, match=r"^export_policy: --ckpt: no checkpoint file at .*nope\.ckpt$"):
        main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "policy")])
    assert list(tmp_path.iterdir()) == []
