"""Issue 11, shape: the LangChain integration writes each flow once.

The sync and async entry points (``invoke`` / ``ainvoke``, ``before_model`` /
``abefore_model``...) are thin drivers of one flow, so (1) no async method repeats its
sync twin's body, and (2) both drivers make the same decisions for the same calls.
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers.guard import GOOD_DOC, POISON_DOC, Retr, decisions_of, make_policy, make_scorer
from helpers.langchain import CountingChat, agent_for, search, tool_call
from langchain_core.messages import HumanMessage
from structlog.testing import capture_logs

import ssd_guard.integrations.langchain as lc
from ssd_guard.integrations.langchain import SSDGuard

PACKAGE = Path(lc.__file__).parent
#: The drivers themselves (iterate / aiterate, run / arun) are the one sanctioned pair.
DRIVERS = PACKAGE.parents[1] / "_flow.py"
#: Statements a driver may have (a docstring not counted).
DRIVER_SIZE = 2


def _functions(tree: ast.AST) -> dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Function definitions by scope (module or class name) and name."""
    scopes: dict[str, dict[str, Any]] = {"<module>": {}}
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            scopes["<module>"][node.name] = node
        elif isinstance(node, ast.ClassDef):
            scopes[node.name] = {
                n.name: n
                for n in node.body
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return scopes


def _size(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return len(body)


def test_sync_and_async_twins_are_thin_drivers() -> None:
    files = sorted(p for p in PACKAGE.glob("*.py") if p != DRIVERS)
    assert {p.name for p in files} >= {"callbacks.py", "runnable.py", "middleware.py"}
    pairs = []
    for path in files:
        for scope, fns in _functions(ast.parse(path.read_text())).items():
            for name, fn in fns.items():
                twin = "_" + name[2:] if name.startswith("_a") else name[1:]
                sync = fns.get(twin) if name.startswith(("a", "_a")) else None
                if sync is None or not isinstance(fn, ast.AsyncFunctionDef):
                    continue
                pairs.append(f"{path.name}:{scope}.{name}")
                assert _size(fn) <= DRIVER_SIZE, f"{path.name}:{scope}.{name} is not a thin driver"
                assert _size(sync) <= DRIVER_SIZE, (
                    f"{path.name}:{scope}.{sync.name} is not a thin driver"
                )
    # the pairs LangChain asks for are there, as drivers
    assert {
        "_base.py:_GuardRunnable._ainvoke",
        "middleware.py:SSDGuardMiddleware.abefore_model",
        "middleware.py:SSDGuardMiddleware.awrap_model_call",
        "middleware.py:SSDGuardMiddleware.awrap_tool_call",
    } <= set(pairs)


def test_one_callback_handler() -> None:
    assert issubclass(lc.AsyncSSDGuard, SSDGuard)
    own = {n for n in vars(lc.AsyncSSDGuard) if not n.startswith("__")}
    assert own == set(), f"AsyncSSDGuard re-implements {own}"


def events(fn: Any) -> list[tuple[Any, ...]]:
    with capture_logs() as logs:
        out = fn()
    evs = [(e["scope"], e["action"], e["rule"], e["step"]) for e in decisions_of(logs)]
    return [*evs, ("output", _content(out))]


def _content(out: Any) -> Any:
    if isinstance(out, list):
        return "".join(str(c.content) for c in out)
    if isinstance(out, dict):
        return out["messages"][-1].content
    return out.content


async def _alist(it: Any) -> list[Any]:
    return [c async for c in it]


WRAP_CASES = {
    "abstain": ("hard", ("good answer",)),
    "regenerate": ("easy", ("bad answer", "good answer")),
    "exhausted": ("easy", ("bad answer",)),
    "retrieve": ("medium", ("good answer",)),
}


@pytest.mark.parametrize("case", sorted(WRAP_CASES))
def test_wrap_sync_and_async_drivers_decide_alike(case: str) -> None:
    prompt, replies = WRAP_CASES[case]

    def guarded() -> Any:
        guard = SSDGuard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))
        return guard.wrap(CountingChat(*replies))

    invoke = events(lambda: guarded().invoke(prompt))
    ainvoke = events(lambda: asyncio.run(guarded().ainvoke(prompt)))
    stream = events(lambda: list(guarded().stream(prompt)))
    astream = events(lambda: asyncio.run(_alist(guarded().astream(prompt))))
    assert invoke == ainvoke == stream == astream
    assert len(invoke) >= 2


@pytest.mark.parametrize("prompt", ["easy", "hard", "medium"])
def test_middleware_sync_and_async_drivers_decide_alike(prompt: str) -> None:
    def agent() -> Any:
        guard = SSDGuard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))
        model = CountingChat(tool_call("search"), "bad answer", "good answer")
        return agent_for(model, guard, [search])

    state = {"messages": [HumanMessage(prompt)]}
    sync = events(lambda: agent().invoke(state))
    async_ = events(lambda: asyncio.run(agent().ainvoke(state)))
    assert sync == async_ and len(sync) >= 2
