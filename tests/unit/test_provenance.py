"""``hidden_state_source`` is decided in one place (:mod:`ssd_guard.provenance`), and the
core does not depend on the LangChain integration."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers.guard import make_policy, make_scorer
from helpers.paths import ROOT

from ssd_guard.errors import ConfigError
from ssd_guard.guard import Guard
from ssd_guard.provenance import resolve_hidden_state_source

LABELS = ("guarded-model", "proxy:")


def _label_literals(path: Path) -> list[int]:
    """Lines of string literals (docstrings excluded) that spell a source label."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and node.value.startswith(LABELS)
        ):
            lines.append(node.lineno)
    return lines


def test_source_labels_are_spelled_only_in_provenance() -> None:
    found = {
        str(p.relative_to(ROOT)): lines
        for p in sorted((ROOT / "ssd_guard").rglob("*.py"))
        if p.name != "provenance.py" and (lines := _label_literals(p))
    }
    assert not found, f"hidden_state_source decided outside ssd_guard/provenance.py: {found}"


class _HF:
    """Looks like a transformers model (config + input embeddings)."""

    config = SimpleNamespace()

    def get_input_embeddings(self) -> None:
        return None


def test_resolution_rules() -> None:
    hf = _HF()
    scorer = SimpleNamespace(model_id="base/model", encoder=SimpleNamespace(model=hf))
    chat = SimpleNamespace(llm=SimpleNamespace(pipeline=SimpleNamespace(model=hf)))
    api = SimpleNamespace(model_name="gpt-x")
    # 1. the scorer's own base model is a fact, whatever was claimed
    assert resolve_hidden_state_source(scorer, model=hf) == "guarded-model"
    assert resolve_hidden_state_source(scorer, model=chat, explicit="proxy:x") == "guarded-model"
    # 2. an explicit label
    assert resolve_hidden_state_source(scorer, model=api, explicit="proxy:x") == "proxy:x"
    # 3. another model: the scorer's model stands in for it
    assert resolve_hidden_state_source(scorer, model=api) == "proxy:base/model"
    # 4. no model: proxy when the policy names one / an integration, else scorer
    assert resolve_hidden_state_source(scorer, proxy=True) == "proxy:base/model"
    assert resolve_hidden_state_source(scorer) == "scorer"
    with pytest.raises(ConfigError):
        resolve_hidden_state_source(scorer, explicit="elsewhere")


def test_guard_views_decide_through_provenance() -> None:
    guard = Guard(make_scorer(), make_policy())
    assert guard.hidden_state_source == "scorer"
    assert guard.for_model().hidden_state_source == "proxy:fake/base-model"  # integration
    api = SimpleNamespace(model_name="gpt-x")
    view = guard.for_model(api)
    assert view.hidden_state_source == "proxy:fake/base-model" and view.guarded_model == "gpt-x"
    assert view.for_model(name="renamed").hidden_state_source == "proxy:fake/base-model"
    explicit = Guard(make_scorer(), make_policy(), hidden_state_source="proxy:my/proxy")
    assert explicit.for_model(api).hidden_state_source == "proxy:my/proxy"
    proxied = make_policy().model_copy(update={"proxy_model": "smollm2"})
    assert Guard(make_scorer(), proxied).hidden_state_source == "proxy:fake/base-model"


def test_importing_the_core_never_imports_the_integration_or_langchain() -> None:
    code = (
        "import sys, ssd_guard, ssd_guard.local, ssd_guard.guard; "
        "bad = [m for m in sys.modules if m.startswith(('ssd_guard.integrations', "
        "'langchain'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
