"""The README and docs/ stay true: relative links resolve (files and #anchors), every `lrl` flag and config key the
README names exists in the CLI, every `scripts/X.py --flag` exists in that script's argparse, and outputs/README.md
lists the committed bases and the demo's base. Fast: the parsers run in-process, each script's --help once."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import os
import re
import runpy
import shlex
import sys
import typing
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted([README, *(ROOT / "docs").rglob("*.md")])

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)((?:(?!\n\s*\n).)+?)\1", re.DOTALL)  # a code span may wrap, not cross a paragraph


# --- markdown helpers ---------------------------------------------------------------------------------------------


def _split(text: str) -> tuple[str, list[str]]:
    """(the text outside fenced blocks, each fenced line replaced by an empty one), the fenced code lines."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (letters, digits, spaces, - and _ kept), spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of a markdown file that does not resolve: the file, and a #anchor of a .md target."""
    problems = []
    prose = INLINE_CODE.sub("", _split(path.read_text())[0])
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{path.relative_to(root)}: {target} (no heading #{anchor} in {dest.name})")
    return problems


# --- the commands the README names --------------------------------------------------------------------------------


def _segments(text: str) -> list[tuple[str, bool]]:
    """Shell command segments of the README: fenced blocks (backslash continuations joined) and inline code spans,
    split at `&&`, `;` and `|`; each with whether it came from inline code."""
    prose, code = _split(text)
    joined = re.sub(r"\\\n", " ", "\n".join(code))
    out = []
    for logical in joined.splitlines():
        logical = logical.split(" #", 1)[0] if not logical.lstrip().startswith("#") else ""
        out += [(s, False) for s in re.split(r"&&|;|\|", logical) if s.strip()]
    for _, span in INLINE_CODE.findall(prose):
        out += [(s, True) for s in re.split(r"&&|;|\|(?!\w)", span.replace("\n", " ")) if s.strip()]
    return out


def _tokens(segment: str) -> list[str]:
    try:
        return shlex.split(segment)
    except ValueError:
        return segment.split()


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(program, flags) per command: program is `lrl <sub>` or `scripts/X.py`; flags keep their `=value`. A bare
    inline span of flags (`--model.init_args.attention=flex` in prose) counts as `lrl fit`."""
    out = []
    for segment, inline in _segments(text):
        toks = _tokens(segment)
        prog, start = None, 0
        for i, tok in enumerate(toks):
            if tok == "lrl" or tok.endswith("/bin/lrl"):
                sub = toks[i + 1] if i + 1 < len(toks) and not toks[i + 1].startswith("-") else "fit"
                prog, start = f"lrl {sub}", i + 1
                break
            if re.fullmatch(r"scripts/\w+\.py", tok):
                prog, start = tok, i + 1
                break
            if "=" not in tok and not tok.startswith("-") and i == 0 and tok not in ("python", "python3"):
                break  # another program (make, pip, tensorboard, a .sh launcher whose flags are SGLang's)
        if prog is None and inline and toks and toks[0].startswith("--"):
            prog = "lrl fit"
        if prog is not None:
            flags = [t for t in toks[start:] if t.startswith("--")]
            if flags:
                out.append((prog, flags))
    return out


# --- what the CLI and the scripts accept ---------------------------------------------------------------------------


def _help_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w.-]*)", text))


def _run_help(fn) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        fn()
    return buf.getvalue()


@cache
def lrl_options(sub: str) -> frozenset[str]:
    from lrl.cli import cli_main, main

    if sub in ("serve", "plan"):  # argparse subcommands of `lrl`, not LightningCLI ones
        return frozenset(_help_options(_run_help(lambda: main([sub, "--help"]))))
    return frozenset(_help_options(_run_help(lambda: cli_main([sub, "--help"]))))


@cache
def script_options(script: str) -> frozenset[str]:
    """The script's own --help, run in-process (cwd, argv and sys.path restored)."""
    cwd, argv, path = os.getcwd(), sys.argv, list(sys.path)
    try:
        sys.argv = [str(ROOT / script), "--help"]
        sys.path.insert(0, str((ROOT / script).parent))
        text = _run_help(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"))
    finally:
        os.chdir(cwd)
        sys.argv, sys.path[:] = argv, path
    return frozenset(_help_options(text))


def _classes(section: str) -> list[type]:
    """The classes the shipped experiment configs name for `model` or `data`, or lightning's Trainer."""
    import importlib

    if section == "trainer":
        from lightning.pytorch import Trainer

        return [Trainer]
    paths = set()
    for cfg in (ROOT / "configs").rglob("*.yaml"):
        class_path = ((yaml.safe_load(cfg.read_text()) or {}).get(section) or {}).get("class_path")
        if class_path:
            paths.add(class_path)
    out = []
    for p in sorted(paths):
        module, _, name = p.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


def _arguments(obj) -> dict[str, object]:
    """Name → annotation of what a class (its __init__) or a dataclass accepts."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(obj)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(obj)}
    init = obj.__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve still names its argument
        hints = {}
    return {n: hints.get(n) for n, p in inspect.signature(init).parameters.items() if n != "self"}


def _candidates(annotation) -> list[type]:
    args = typing.get_args(annotation)
    return [a for a in (args or (annotation,)) if isinstance(a, type) and a is not type(None)]


def config_key_exists(key: str) -> bool:
    """`model.init_args.lr`, `data.init_args.rollout.urls`, `trainer.devices`: each part is an argument of the
    class (or typed dataclass) the previous part names."""
    section, *rest = key.split(".")
    if section not in ("model", "data", "trainer"):
        return False
    if section != "trainer":
        if not rest or rest[0] != "init_args":
            return False
        rest = rest[1:]
    if not rest:
        return True
    levels: list = _classes(section)
    for part in rest:
        found = [arg for obj in levels for name, arg in _arguments(obj).items() if name == part]
        if not found:
            return False
        levels = [c for ann in found for c in _candidates(ann) if c.__module__ != "builtins"]
        if not levels:  # a plain value (int, str, list, ...): nothing may follow it
            return part == rest[-1]
    return True


def flag_problem(prog: str, flag: str) -> str | None:
    name = flag.split("=", 1)[0]
    if prog.startswith("scripts/"):
        return None if name in script_options(prog) else f"{prog} has no {name}"
    sub = prog.split()[1]
    if sub in ("serve", "plan"):
        return None if name in lrl_options(sub) else f"lrl {sub} has no {name}"
    if "." in name:
        return None if config_key_exists(name[2:]) else f"lrl {sub}: {name} is not a config key"
    return None if name in lrl_options(sub) else f"lrl {sub} has no {name}"


# --- tests ---------------------------------------------------------------------------------------------------------


def test_readme_is_at_most_300_lines():
    assert len(README.read_text().splitlines()) <= 300


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert link_problems(path) == []


def test_link_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Will it fit?\n\n## The `sums` task (demo)\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#will-it-fit) [ok](b.md#the-sums-task-demo) [ok](#top)\n# Top\n"
                    "[gone](c.md) [bad](b.md#nowhere) `[not a link](x.md)`\n```\n[code](y.md)\n```\n")
    assert link_problems(page, root=tmp_path) == [
        "a.md: c.md (no such file)",
        "a.md: b.md#nowhere (no heading #nowhere in b.md)",
    ]


def test_readme_commands_are_found():
    """The extractor sees the README's commands (a regex that found none would pass every flag check)."""
    found = commands(README.read_text())
    progs = {p for p, _ in found}
    assert {"lrl fit", "lrl validate", "lrl serve", "scripts/make_sdar_like.py", "scripts/export_policy.py"} <= progs
    fit_flags = {f.split("=")[0] for p, fs in found if p == "lrl fit" for f in fs}
    assert {"--config", "--checkpoint", "--block_size", "--ckpt_path", "--data.init_args.rollout.urls"} <= fit_flags


def test_every_flag_the_readme_names_exists():
    problems = [msg for prog, flags in commands(README.read_text()) for f in flags if (msg := flag_problem(prog, f))]
    assert problems == []


def test_every_config_key_the_readme_names_exists():
    keys = {span for _, span in INLINE_CODE.findall(_split(README.read_text())[0])
            if re.fullmatch(r"(model|data)\.init_args\.[\w.]+|trainer\.\w+", span)}
    assert keys, "no config keys found in the README"
    assert sorted(k for k in keys if not config_key_exists(k)) == []


def test_flag_checks_reject_what_does_not_exist():
    assert flag_problem("lrl fit", "--model.init_args.no_such_knob=1") is not None
    assert flag_problem("lrl fit", "--data.init_args.rollout.no_such_field=1") is not None
    assert flag_problem("lrl fit", "--data.init_args.group_size.deeper=1") is not None
    assert flag_problem("lrl fit", "--no_such_flag") is not None
    assert flag_problem("lrl serve", "--no-such-flag") is not None
    assert flag_problem("scripts/export_policy.py", "--no-such-flag") is not None
    assert flag_problem("lrl fit", "--data.init_args.rollout.cuda_graphs=true") is None
    assert flag_problem("lrl fit", "--trainer.devices=2") is None


def test_outputs_readme_lists_every_committed_base_and_the_demo_base():
    text = (ROOT / "outputs" / "README.md").read_text()
    bases = sorted(p.parent.name for p in (ROOT / "outputs" / "base").glob("*/config.json"))
    assert bases and [b for b in bases if f"`base/{b}`" not in text] == []
    demo = ast.parse((ROOT / "scripts" / "demo.py").read_text())
    quickstart = next(n.value.value for n in demo.body if isinstance(n, ast.Assign)
                      and getattr(n.targets[0], "id", None) == "QUICKSTART")
    checkpoint = yaml.safe_load((ROOT / quickstart).read_text())["checkpoint"]
    assert checkpoint.startswith("outputs/base/")
    demo_rows = [ln for ln in text.splitlines() if "make demo" in ln and ln.startswith("|")]
    assert len(demo_rows) == 1 and f"`base/{checkpoint.removeprefix('outputs/base/')}`" in demo_rows[0]


def test_the_readme_reward_example_is_a_working_reward_term():
    """The README's "your own reward" class runs as written: one raw value per response (shorter is higher),
    shaped per prompt group like the shipped terms."""
    import torch

    from lrl.rollout.types import RolloutBatch

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the project's own README
    term = namespace["ShortAnswers"](weight=0.5)
    n = 4
    responses = [[5] * 3, [5], [5] * 2, [5] * 2]
    batch = RolloutBatch(prompt_ids=[[1]] * n, response_ids=responses, texts=[""] * n,
                         step_maps=[[1] * len(r) for r in responses], num_forwards=torch.ones(n, dtype=torch.long),
                         num_store_passes=torch.zeros(n, dtype=torch.long), finish_reasons=["stop"] * n,
                         group_index=torch.tensor([0, 0, 1, 1]))
    raw = term.raw(batch)
    assert raw.tolist() == [-3.0, -1.0, -2.0, -2.0]
    # z-scored per group × 0.5: the shorter of group 0 gets +0.5, the flat group 1 gets 0
    assert term.shape(raw, batch.group_index).tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert term.name == "short"
