"""`base:` makes a config an overlay: `--config overlay.yaml` reads its base first (lrl.config_files)."""

from __future__ import annotations

import pytest

from lrl.config_files import expand_bases, expand_config_args, merged_config


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_an_overlay_reads_its_base_chain_first_relative_to_its_own_folder(tmp_path):
    root = _write(tmp_path, "root.yaml", "a: 1\nb: 1\nc: 1\n")
    mid = _write(tmp_path, "sub/mid.yaml", "base: ../root.yaml\nb: 2\n")
    top = _write(tmp_path, "top.yaml", "base: sub/mid.yaml\nc: 3\n")
    assert expand_bases([top]) == [str(root.resolve()), str(mid.resolve()), str(top)]
    assert merged_config([str(top)]) == {"a": 1, "b": 2, "c": 3}  # `base` itself is not a value


def test_a_base_given_earlier_is_not_read_again(tmp_path):
    """`--config base --config piece --config overlay`: re-reading the base before the overlay would undo the
    piece."""
    base = _write(tmp_path, "base.yaml", "model: big\nlr: 1\n")
    piece = _write(tmp_path, "piece.yaml", "model: tiny\n")
    overlay = _write(tmp_path, "overlay.yaml", "base: base.yaml\nlr: 2\n")
    assert expand_bases([base, piece, overlay]) == [str(base), str(piece), str(overlay)]
    assert merged_config([str(base), str(piece), str(overlay)]) == {"model": "tiny", "lr": 2}
    args = ["fit", "--config", str(base), f"--config={piece}", "--config", str(overlay), "--lr", "3"]
    assert expand_config_args(args) == ["fit", "--config", str(base), "--config", str(piece), "--config",
                                        str(overlay), "--lr", "3"]


def test_the_command_line_gets_the_base_before_the_overlay(tmp_path):
    base = _write(tmp_path, "base.yaml", "lr: 1\n")
    overlay = _write(tmp_path, "overlay.yaml", "base: base.yaml\nlr: 2\n")
    assert expand_config_args(["fit", f"--config={overlay}", "--checkpoint", "x"]) == [
        "fit", "--config", str(base.resolve()), "--config", str(overlay), "--checkpoint", "x"]
    # a YAML string instead of a file passes through untouched
    assert expand_config_args(["fit", "--config", "lr: 5"]) == ["fit", "--config", "lr: 5"]


def test_a_missing_base_and_a_circle_are_one_line_errors(tmp_path):
    lost = _write(tmp_path, "lost.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ValueError, match=r"lost.yaml: base: nowhere.yaml does not exist"):
        expand_bases([lost])
    _write(tmp_path, "a.yaml", "base: b.yaml\n")
    b = _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ValueError, match="overlay each other in a circle"):
        expand_bases([b])


def test_lrl_fit_reports_a_missing_base_in_one_line(tmp_path, capsys):
    from lrl.cli import main

    lost = _write(tmp_path, "lost.yaml", "base: nowhere.yaml\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(lost), "--checkpoint", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base: nowhere.yaml does not exist" in err[0]
