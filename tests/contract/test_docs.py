"""The documentation stays short at the front, generated where it holds figures, and builds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from helpers.paths import ROOT


def test_readme_is_short_and_keeps_the_two_quick_start_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "bash scripts/install.sh && ssd-guard demo" in quick
    assert "python -m pytest -q" in quick
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/install.sh" in ci and "python -m pytest -q" in ci


def test_readme_links_point_at_files_that_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [part.split(")", 1)[0] for part in text.split("](")[1:]]
    assert links, "the README links to the docs"
    missing = [link for link in links if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, missing


def test_results_pages_are_generated_from_the_json_and_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location(
        "results_docs", ROOT / "scripts" / "results_docs.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pages = mod.pages()
    assert "outcome-smollm2.md" in pages and "smollm2-triviaqa.md" in pages
    for name, text in pages.items():
        on_disk = ROOT / "docs" / "results" / name
        assert on_disk.is_file(), f"docs/results/{name} missing: run python scripts/results_docs.py"
        assert on_disk.read_text(encoding="utf-8") == text, (
            f"docs/results/{name} is stale: run python scripts/results_docs.py"
        )
    extra = {p.name for p in (ROOT / "docs" / "results").glob("*.md")} - set(pages) - {"index.md"}
    assert not extra, f"pages without a result file: {sorted(extra)}"


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "results" / "outcome-smollm2" / "index.html").is_file()
