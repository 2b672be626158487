"""The public surface is typed for users: the lazily loaded LangChain classes are not
``Any`` to a type checker, and every public error is exported."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import ROOT

import ssd_guard
from ssd_guard.errors import GuardInputError, SSDGuardError

USER_CODE = """
import ssd_guard
from ssd_guard import AsyncSSDGuard, GuardInputError, SSDGuard, SSDGuardMiddleware

handler: SSDGuard = SSDGuard(policy="policy.yaml")
mw: SSDGuardMiddleware = handler.middleware()
also: AsyncSSDGuard = ssd_guard.AsyncSSDGuard(policy="policy.yaml")
err: GuardInputError = GuardInputError("prompt", "bad")
wrong_handler: int = handler
wrong_middleware: int = mw
"""


def test_lazy_names_have_type_checking_imports() -> None:
    tree = ast.parse((ROOT / "ssd_guard" / "__init__.py").read_text(encoding="utf-8"))
    typed: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    typed.update(a.asname or a.name for a in stmt.names)
    assert typed >= set(ssd_guard._LAZY)


def test_every_public_error_is_exported() -> None:
    import ssd_guard.errors as errors

    public = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, SSDGuardError) and not name.startswith("_")
    }
    assert public <= set(ssd_guard.__all__)
    assert ssd_guard.GuardInputError is GuardInputError


def test_a_type_checker_sees_the_real_classes(tmp_path: Path) -> None:
    if shutil.which("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed (pip install -e '.[dev]')")
        pytest.skip("mypy is not installed")
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(user)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    # Exactly the two deliberate mistakes: had the classes been Any, mypy would say nothing.
    assert out.count("error:") == 2, out + proc.stderr
    assert 'expression has type "SSDGuard", variable has type "int"' in out
    assert 'expression has type "SSDGuardMiddleware", variable has type "int"' in out


def test_the_root_surface_is_curated_and_moved_names_still_resolve() -> None:
    import warnings

    assert len(ssd_guard.__all__) <= 25
    core = {"Guard", "GuardResult", "SSDScorer", "SSDGuard", "load_policy", "configure_audit"}
    assert core <= set(ssd_guard.__all__)
    assert not set(ssd_guard._MOVED) & set(ssd_guard.__all__)
    from ssd_guard.mixture import GaussianMixture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ssd_guard.GaussianMixture is GaussianMixture  # type: ignore[attr-defined]
    assert any("ssd_guard.mixture" in str(w.message) for w in caught)
    with pytest.raises(AttributeError):
        ssd_guard.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
