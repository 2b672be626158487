"""The package stays layered by role, checked by import-linter (``lint-imports``) with the
contracts in ``pyproject.toml``: edge (CLI) > offline (evaluation, training) >
integrations > runtime > model side > foundation; the runtime never imports the offline
side; only the integrations and the demo import LangChain; no import cycle between
sibling modules at any depth (imports inside functions count)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers.paths import ROOT

PKG = ROOT / "ssd_guard"


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(config["tool"]["importlinter"]["contracts"])


def test_the_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = [line for line in proc.stdout.splitlines() if line.endswith(" KEPT")]
    assert len(kept) == len(_contracts()) >= 4, proc.stdout


def test_every_top_level_module_has_a_layer() -> None:
    """A new module cannot escape the layering: each top-level module or package of
    ``ssd_guard`` is named in the layers contract."""
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    named = {
        name.strip()
        for layer in layers["layers"]  # type: ignore[attr-defined]
        for name in str(layer).replace("|", ":").split(":")
    }
    tops = {
        f"ssd_guard.{p.stem if p.is_file() else p.name}"
        for p in PKG.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert tops - named == set(), f"modules with no layer: {sorted(tops - named)}"
    assert named - tops == set(), f"layers naming no module: {sorted(named - tops)}"


def test_the_runtime_is_forbidden_the_offline_side() -> None:
    (rule,) = [c for c in _contracts() if c.get("id") == "runtime-not-offline"]
    assert set(rule["forbidden_modules"]) == {"ssd_guard.training", "ssd_guard.evaluation"}  # type: ignore[arg-type]
    for runtime in ("ssd_guard.guard", "ssd_guard.scoring", "ssd_guard.integrations"):
        assert runtime in rule["source_modules"]  # type: ignore[operator]
