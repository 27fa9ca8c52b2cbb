"""The package's layout holds: no import cycles, stages import only downward, light modules stay light.

The import graph is read from the source (``ast``), not from what an import happens to execute:
every ``import`` statement counts, those inside functions included (a function-level import is a
dependency that is merely deferred), except those under ``if TYPE_CHECKING:`` (annotations only).
The lazy ``__getattr__`` of a package ``__init__`` imports names computed at run time and is not
part of the graph; in exchange, no module of ours may import the root package ``gqa_uptrain``
itself, whose lazy names point at the top of every stage.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gqa_uptrain"
ROOT = REPO / PACKAGE

# Modules at the package's top level: the core, importable from every stage.
TOP_LEVEL = {
    "errors": "core",
    "_version": "core",
    "_moved": "core",
}
CORE = "core"  # errors and the version: importable from everywhere

# Which stages each stage may import (besides itself and the core). An entry with a dot allows one
# module of a stage only ("hub.card": the conversion writes a card but does not publish).
# ``modeling`` imports nothing of ours (it ships inside checkpoints), so depending on it cannot make a
# cycle: every stage that loads or builds a transformers model imports it to register our GQA
# classes with the Auto classes (io's model loader, the calibration's model skeleton, gqa-export's
# folder check).
ALLOWED: dict[str, set[str]] = {
    "io": {"modeling"},
    "architectures": {"io", "modeling"},
    "merging": {"architectures", "io", "data", "modeling"},
    "conversion": {"merging", "architectures", "io", "hub.card"},
    "data": set(),
    "training": {"data", "evaluation", "io", "architectures", "hub", "modeling"},
    "evaluation": {"data", "io", "architectures", "modeling"},
    "hub": {"io", "modeling"},
    "modeling": set(),
    "cli": {"*"},
}

# Imported by recipes, cards and the command line before any work starts: no torch, no datasets.
LIGHT = [
    PACKAGE,
    f"{PACKAGE}.io.locate",
    f"{PACKAGE}.data",
    f"{PACKAGE}.data.config",
    f"{PACKAGE}.training",
    f"{PACKAGE}.training.config",
    f"{PACKAGE}.hub",
    f"{PACKAGE}.hub.card",
    f"{PACKAGE}.cli.export",
]
HEAVY = ("torch", "datasets")


@cache
def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package ``__init__``)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:``."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and _is_type_checking(node) and child in node.body:
                continue  # the else branch, if any, runs
            todo.append(child)
    return found


@cache
def graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (``from P import N`` is P.N when that is a module)."""
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base = here[: len(here) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                targets.add(sub if sub in mods else prefix)
        edges[name] = {t for t in targets if t in mods and t != name}
    return edges


def stage(module: str) -> str:
    """The stage a module belongs to: its folder under the package, or TOP_LEVEL's entry."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if len(parts) == 2 and parts[1] in TOP_LEVEL:
        return TOP_LEVEL[parts[1]]
    return parts[1]


def _allowed(source: str, target: str) -> bool:
    src, dst = stage(source), stage(target)
    if dst == "package":
        return False  # the root package's lazy names reach every stage: importing it closes cycles
    if dst in (src, CORE):
        return True
    rules = ALLOWED[src]
    relative = target.removeprefix(PACKAGE + ".")
    return "*" in rules or dst in rules or any(relative == r or relative.startswith(r + ".") for r in rules)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: relative and absolute, function-level, ``TYPE_CHECKING`` left out."""
    edges = graph()
    assert f"{PACKAGE}.io.gguf" in edges[f"{PACKAGE}.io.checkpoint"]  # inside open_source()
    assert f"{PACKAGE}.conversion.card" in edges[f"{PACKAGE}.conversion.pipeline"]  # inside convert()
    assert f"{PACKAGE}.modeling" in edges[f"{PACKAGE}.hub.publish"]  # inside check_folder()
    assert f"{PACKAGE}.errors" in edges[f"{PACKAGE}.io.locate"]
    assert f"{PACKAGE}.conversion.pipeline" not in edges[f"{PACKAGE}.conversion.card"]  # TYPE_CHECKING
    assert all(stage(m) in ALLOWED or stage(m) in (CORE, "package") for m in edges), "a stage with no rule"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_stages_import_only_downward():
    bad = sorted(
        f"{src} -> {dst}" for src, targets in graph().items() for dst in targets if not _allowed(src, dst)
    )
    assert not bad, "imports against the layering (see ALLOWED):\n" + "\n".join(bad)


def _import_in_fresh_interpreter(module: str) -> dict:
    code = f"""
        import json, sys, time
        start = time.perf_counter()
        import {module}
        seconds = time.perf_counter() - start
        print(json.dumps({{"seconds": seconds, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_neither_torch_nor_datasets(module):
    assert _import_in_fresh_interpreter(module)["heavy"] == []


def test_package_import_takes_milliseconds():
    # Generous (about 10 ms here; torch alone takes over a second), and the best of three runs.
    seconds = min(_import_in_fresh_interpreter(PACKAGE)["seconds"] for _ in range(3))
    assert seconds < 0.5, seconds


def test_merging_pieces_read_top_to_bottom():
    """The merging stage's files and functions stay short enough to read in one go (issue 22 split
    the 872-line ``aligned.py`` and the 135-line ``refine_module``): at most 650 lines a file, 110 a
    function."""
    long = []
    for path in sorted((ROOT / "merging").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 650:
            long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > 110:
                long.append(f"{path.name}:{node.name}: {size} lines")
    assert not long, long
