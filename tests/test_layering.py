"""The packages import downward only and in no circle (issue 31 item 6; style guide: models → rollout →
rewards/algorithms → module and datamodules → callbacks → cli).

Every ``import`` / ``from … import`` of lrl/, callbacks/ and datamodules/ is read from the source (AST, function-level
imports included, since a lazy import still ties the two modules together); ``from pkg import name`` counts as an
import of ``pkg.name`` when that is a module, else of ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lrl", "callbacks", "datamodules")

# Lowest first. A module may import its own layer or lower ones. Each entry is a module or package prefix, except
# `lrl` (lrl/__init__.py only): a new lrl.<name> must be placed here by hand.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("models", ("lrl", "lrl.models", "lrl.metrics", "lrl.config_files", "lrl.atomic")),
    ("rollout", ("lrl.rollout",)),
    ("rewards/algorithms", ("lrl.rewards", "lrl.algorithms", "lrl.tasks", "lrl.evaluation")),
    ("module/datamodules", ("lrl.module", "lrl.module_step", "lrl.module_planner", "lrl.module_lora", "lrl.sft",
                            "lrl.pipeline", "datamodules")),
    ("callbacks", ("callbacks",)),
    ("cli", ("lrl.cli", "lrl.cli_checks", "lrl.cli_errors", "lrl.plan", "lrl.serve")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` (at ``path``) imports anywhere in its source."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int | None:
    """Index of the layer with the longest prefix matching ``module``."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (p != "lrl" and module.startswith(p + "."))) and len(p) > best:
                best, index = len(p), i
    return index


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_imports_go_downward_only():
    graph = _graph()
    unplaced = sorted(m for m in graph if _layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    upward = sorted(f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert not upward, "\n".join(upward)


def test_block_lm_does_not_import_loading():
    """The circle of issue 31: block_lm saved through loading, which builds block_lm's class."""
    graph = _graph()
    assert "lrl.models.loading" not in graph["lrl.models.block_lm"]
    assert "lrl.models.block_lm" in graph["lrl.models.loading"]


@pytest.mark.parametrize("source, expected", [
    ("from lrl.models import loading\n", {"lrl.models.loading"}),  # a submodule by name
    ("from lrl.models import save_checkpoint\n", {"lrl.models"}),  # a name: the package's __init__
    ("def f():\n    from . import loading\n", {"lrl.models.loading"}),  # relative, inside a function
    ("import lrl.rollout.types as t\n", {"lrl.rollout.types"}),
])
def test_the_reader_sees_every_kind_of_import(tmp_path, source, expected):
    path = tmp_path / "block_lm.py"
    path.write_text(source)
    known = {"lrl.models", "lrl.models.loading", "lrl.models.block_lm", "lrl.rollout.types"}
    assert _imports("lrl.models.block_lm", path, known) == expected


def test_the_checks_fail_on_a_circle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("lrl.models.block_lm") < _layer("lrl.rollout.engine") < _layer("lrl.algorithms.losses")
    assert _layer("lrl.module_step") == _layer("datamodules.rollout") < _layer("callbacks.weight_sync")
    assert _layer("lrl.module_step") > _layer("lrl.algorithms.losses")  # `lrl.module` prefix is not `lrl.module_`
    assert _layer("lrl.something_new") is None  # unplaced: test_imports_go_downward_only names it
