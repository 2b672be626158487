"""Issue 11, shape: the guard and the Redis cache write each flow once.

``Guard`` (check prompt / answer / documents, screen, retrieve, prepare, complete, run)
and ``RedisCache`` (get / set and their batches) write each flow once, as a generator
yielding :class:`~ssd_guard._flow.Call` effects; the public sync and async methods are
thin drivers of it (:func:`~ssd_guard._flow.run` / :func:`~ssd_guard._flow.arun`).
So (1) no async method repeats its sync twin's body, and (2) both drivers make the same
decisions for the same calls.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from helpers.fakes import FailingCache
from helpers.guard import GOOD_DOC, POISON_DOC, Gen, Retr, decisions_of, make_policy, make_scorer
from structlog.testing import capture_logs

import ssd_guard.cache.redis_cache as cache_mod
import ssd_guard.guard.core as guard_mod
from ssd_guard import _flow as flow
from ssd_guard._flow import Call, Flow
from ssd_guard.errors import CacheUnavailableError
from ssd_guard.guard import Guard

#: Statements a driver may have (a docstring not counted).
DRIVER_SIZE = 2
#: The async methods that are not drivers: the async side of one effect (the sync side is
#: the other half of the same ``Call``), each a few lines.
EFFECTS = {"Guard": {"_acall_retriever"}, "RedisCache": {"_acommand"}}
EFFECT_SIZE = 5
#: Every sync / async pair each class must have, as drivers.
PAIRS = {
    "Guard": {
        "check_prompt",
        "check_answer",
        "check_documents",
        "screen_documents",
        "retrieve",
        "prepare",
        "complete",
        "run",
    },
    "RedisCache": {"get", "get_many", "set", "set_many"},
}


def _class(path: Path, name: str) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text())
    (cls,) = (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _size(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return len(body)


def _calls(fn: ast.AST) -> set[str]:
    """The dotted names *fn* calls (``flow.run``, ``len``...)."""
    return {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}


@pytest.mark.parametrize(
    ("path", "name"),
    [(Path(guard_mod.__file__), "Guard"), (Path(cache_mod.__file__), "RedisCache")],
)
def test_async_methods_are_thin_drivers(path: Path, name: str) -> None:
    fns = _class(path, name)
    drivers = set()
    for fname, fn in fns.items():
        if not isinstance(fn, ast.AsyncFunctionDef):
            continue
        if fname in EFFECTS[name]:
            assert _size(fn) <= EFFECT_SIZE, f"{name}.{fname} is more than an effect"
            continue
        # no private twins left (_alookup, _acheck, _arun...): only public drivers
        assert not fname.startswith("_"), f"{name}.{fname}: a private async twin"
        if fname in ("aclose",):  # lifecycle: not a flow
            continue
        twin = fns.get(fname[1:])
        assert twin is not None and isinstance(twin, ast.FunctionDef), f"{name}.{fname}"
        assert _size(fn) <= DRIVER_SIZE, f"{name}.{fname} is not a thin driver"
        assert _size(twin) <= DRIVER_SIZE, f"{name}.{twin.name} is not a thin driver"
        assert "flow.arun" in _calls(fn), f"{name}.{fname} does not drive a flow"
        assert "flow.run" in _calls(twin), f"{name}.{twin.name} does not drive a flow"
        drivers.add(twin.name)
    assert drivers >= PAIRS[name]


# --------------------------------------------------------------------------------------
# The drivers
# --------------------------------------------------------------------------------------
def _flow(log: list[str]) -> Flow[str]:
    a = yield Call(lambda: "sync-a", lambda: _const("async-a"))
    log.append(a)
    b = yield Call(_Ready)  # no async side: the result is awaited when awaitable
    log.append(b if isinstance(b, str) else "not awaited")
    try:
        yield Call(_boom, _aboom)
    except KeyError as exc:
        log.append(f"caught {exc.args[0]}")
    return "done"


async def _const(value: str) -> str:
    return value


class _Ready:
    def __await__(self) -> Generator[None, None, str]:
        yield from ()
        return "awaited-b"


def _boom() -> None:
    raise KeyError("sync")


async def _aboom() -> None:
    raise KeyError("async")


def test_drivers_send_results_and_throw_errors_into_the_flow() -> None:
    sync_log: list[str] = []
    async_log: list[str] = []
    # (the sync driver never awaits: an awaitable returned by an effect is its result)
    out = flow.run(_flow(sync_log))
    assert out == "done" and sync_log == ["sync-a", "not awaited", "caught sync"]
    assert asyncio.run(flow.arun(_flow(async_log))) == "done"
    assert async_log == ["async-a", "awaited-b", "caught async"]


def test_an_uncaught_error_closes_the_flow() -> None:
    closed: list[bool] = []

    def failing() -> Flow[None]:
        try:
            yield Call(_boom, _aboom)
        finally:
            closed.append(True)

    with pytest.raises(KeyError, match="sync"):
        flow.run(failing())
    with pytest.raises(KeyError, match="async"):
        asyncio.run(flow.arun(failing()))
    assert closed == [True, True]


# --------------------------------------------------------------------------------------
# Sync and async decide alike
# --------------------------------------------------------------------------------------
RUN_CASES = {
    "allow": ("easy", ("good answer",), None),
    "abstain": ("hard", ("good answer",), None),
    "regenerate": ("easy", ("bad answer", "good answer"), None),
    "exhausted": ("easy", ("bad answer",), None),
    "retrieve": ("medium", ("good answer",), None),
    "documents": ("easy", ("good answer",), [GOOD_DOC, POISON_DOC]),
}


def _events(logs: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (e["scope"], e["action"], e["rule"], e["step"], e.get("cache_hit"))
        for e in decisions_of(logs)
    ]


def _outcome(res: Any) -> tuple[Any, ...]:
    return (
        res.output,
        res.abstained,
        res.final_prompt,
        res.documents,
        res.dropped,
        res.rejected,
        res.generations,
        res.regeneration,
        [(d.scope, d.action, d.rule) for d in res.decisions],
    )


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_and_arun_decide_alike(case: str) -> None:
    prompt, answers, documents = RUN_CASES[case]

    def guard() -> Guard:
        return Guard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))

    with capture_logs() as sync_logs:
        sync = guard().run(prompt, Gen(*answers), documents=documents)
    with capture_logs() as async_logs:
        async_ = asyncio.run(guard().arun(prompt, Gen(*answers), documents=documents))
    assert _outcome(sync) == _outcome(async_)
    assert _events(sync_logs) == _events(async_logs)
    assert len(_events(sync_logs)) >= 1


def test_checks_and_screen_decide_alike() -> None:
    def calls(g: Guard) -> list[Any]:
        return [
            g.check_prompt("medium"),
            g.check_answer("easy", "bad answer"),
            g.check_documents("easy", [GOOD_DOC, POISON_DOC])[:2],
            g.screen_documents("easy", [GOOD_DOC, POISON_DOC]).documents,
            g.retrieve("medium", 1),
        ]

    async def acalls(g: Guard) -> list[Any]:
        return [
            await g.acheck_prompt("medium"),
            await g.acheck_answer("easy", "bad answer"),
            (await g.acheck_documents("easy", [GOOD_DOC, POISON_DOC]))[:2],
            (await g.ascreen_documents("easy", [GOOD_DOC, POISON_DOC])).documents,
            await g.aretrieve("medium", 1),
        ]

    def guard() -> Guard:
        return Guard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))

    sync, async_ = calls(guard()), asyncio.run(acalls(guard()))
    assert [getattr(x, "action", x) for x in sync] == [getattr(x, "action", x) for x in async_]
    assert sync[0].action == "retrieve" and sync[2] == ([GOOD_DOC], [POISON_DOC])


def test_a_closed_cache_blocks_alike() -> None:
    gen = Gen()
    guard = Guard(make_scorer(), make_policy(), cache=FailingCache("closed"))
    with pytest.raises(CacheUnavailableError, match="fail_mode is 'closed'"):
        guard.run("easy", gen)
    with pytest.raises(CacheUnavailableError, match="fail_mode is 'closed'"):
        asyncio.run(guard.arun("easy", gen))
    assert gen.calls == 0
