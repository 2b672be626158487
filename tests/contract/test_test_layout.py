"""The test suite's own layout: ``tests/unit/<mirror of the package>``,
``tests/integration/`` (real models, servers, scripts), ``tests/contract/`` (what the
package promises: layers, public surface, docs, shapes); shared code in ``tests/helpers/``;
no test module imports another."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from helpers.paths import ROOT, TESTS

KINDS = ("unit", "integration", "contract")


def _test_files() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_every_test_module_is_unit_integration_or_contract() -> None:
    misplaced = [
        p.relative_to(TESTS) for p in _test_files() if p.relative_to(TESTS).parts[0] not in KINDS
    ]
    assert not misplaced, f"test modules outside tests/{{{','.join(KINDS)}}}/: {misplaced}"


def test_unit_tests_mirror_the_package() -> None:
    for p in (TESTS / "unit").rglob("test_*.py"):
        sub = p.parent.relative_to(TESTS / "unit")
        if sub.parts:
            assert (ROOT / "ssd_guard" / sub).is_dir(), f"{p}: ssd_guard/{sub} does not exist"


def test_no_test_module_imports_another() -> None:
    names = {p.stem for p in _test_files()}
    bad = []
    for p in [*_test_files(), *TESTS.rglob("helpers/*.py"), TESTS / "conftest.py"]:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            mods: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            bad += [f"{p.relative_to(TESTS)}: {m}" for m in mods if m.split(".")[-1] in names]
    assert not bad, "shared test code belongs in tests/helpers/: " + "; ".join(bad)


def test_test_module_names_are_unique() -> None:
    # the suite imports test modules by their base name (rootdir-relative, no packages)
    dupes = [n for n, c in Counter(p.stem for p in _test_files()).items() if c > 1]
    assert not dupes, dupes
