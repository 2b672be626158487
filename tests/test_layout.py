"""The package layout stays layered: no import cycles, the core never imports the
integrations, the runtime scorer never imports the evaluation (read with ``ast``, no
import is executed)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ssd_guard"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def _imports(module: str, lazy: bool) -> frozenset[str]:
    """The ``ssd_guard`` modules *module* imports: at module level (class bodies, ``if``
    and ``try`` blocks included; ``if TYPE_CHECKING:`` excluded), plus the imports inside
    functions when *lazy*. ``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``."""
    mods = _modules()
    path = mods[module]
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])

    def walk(stmts: Iterable[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if lazy:
                    walk(node.body)
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                walk(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in mods else base)
            else:
                for field in ("body", "orelse", "finalbody"):
                    walk(getattr(node, field, None) or [])
                for handler in getattr(node, "handlers", None) or []:
                    walk(handler.body)
                for case in getattr(node, "cases", None) or []:
                    walk(case.body)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    return frozenset(m for m in found if m in mods and m != module)


def _graph(lazy: bool) -> dict[str, frozenset[str]]:
    # A package's own lazy ``__getattr__`` loaders are its public surface, not a
    # dependency: its functions are never counted.
    return {m: _imports(m, lazy and p.name != "__init__.py") for m, p in _modules().items()}


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
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


def _describe(cycles: list[list[str]], graph: dict[str, frozenset[str]]) -> str:
    lines = []
    for comp in cycles:
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        lines.append("cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(edges))
    return "\n".join(lines)


def test_the_cycle_finder_finds_cycles() -> None:
    g = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"a"}),
        "e": frozenset(),
    }
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": frozenset({"b"}), "b": frozenset()}) == []


def test_the_import_reader_sees_what_matters() -> None:
    imports = _imports("ssd_guard.distill.stages_late", lazy=False)
    assert "ssd_guard.distill.workdir" in imports
    assert "ssd_guard.student" not in imports  # imported inside a function only
    assert "ssd_guard.student" in _imports("ssd_guard.distill.stages_late", lazy=True)
    # ``if TYPE_CHECKING:`` imports are not runtime imports.
    assert "ssd_guard.distill.pipeline" not in _imports("ssd_guard.distill.stages_late", True)


def test_no_import_cycle_at_module_level() -> None:
    graph = _graph(lazy=False)
    cycles = _cycles(graph)
    assert not cycles, _describe(cycles, graph)


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    # A lazy import only hides a cycle (pipeline <-> stages_late and report <-> runner
    # were such cycles); shared pieces belong in a module both sides import.
    graph = _graph(lazy=True)
    cycles = _cycles(graph)
    assert not cycles, _describe(cycles, graph)


def test_core_never_imports_integrations_at_module_level() -> None:
    bad = {
        m: sorted(d for d in deps if d.startswith("ssd_guard.integrations"))
        for m, deps in _graph(lazy=False).items()
        if not m.startswith("ssd_guard.integrations")
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"core modules importing ssd_guard.integrations: {bad}"


@pytest.mark.parametrize("lazy", [False, True])
def test_runtime_scorer_never_imports_evaluation(lazy: bool) -> None:
    bad = {
        m: sorted(d for d in deps if d.startswith("ssd_guard.evaluation"))
        for m, deps in _graph(lazy).items()
        if m.startswith("ssd_guard.scoring")
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"ssd_guard.scoring importing the evaluation: {bad}"


def test_baselines_are_evaluation_only() -> None:
    """TD, SE, SEP and PCP (and their shared statistics) serve `ssd-guard evaluate` only."""
    bad = {
        m: sorted(d for d in deps if d.startswith("ssd_guard.evaluation.baselines"))
        for m, deps in _graph(lazy=True).items()
        if not m.startswith("ssd_guard.evaluation")
    }
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"runtime modules importing the evaluation baselines: {bad}"
    assert not any(
        (PKG / "scoring" / f"{name}.py").exists()
        for name in ("stats", "semantic_entropy", "probes", "dispersion")
    )
