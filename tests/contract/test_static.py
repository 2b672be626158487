"""The code stays ruff-clean, ruff-formatted and mypy-clean (the dev extra installs both)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers.paths import ROOT

PATHS = ["ssd_guard", "tests", "examples", "benchmarks"]


def _tool(name: str) -> list[str]:
    if shutil.which(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (pip install -e '.[dev]')")
        pytest.skip(f"{name} is not installed")
    return [name] if name == "ruff" else [sys.executable, "-m", name]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"


def test_ruff_lint() -> None:
    _run([*_tool("ruff"), "check", *PATHS])


def test_ruff_format() -> None:
    _run([*_tool("ruff"), "format", "--check", *PATHS])


def test_mypy_library() -> None:
    _run([*_tool("mypy"), "ssd_guard"])
