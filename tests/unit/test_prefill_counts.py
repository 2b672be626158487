"""Base-model forward passes per guarded call, counted on every path.

The guard reads the prompt's hidden state (one truncated prefill of the scorer's base
model) once per call and hands it to every later check of that call in its
:class:`~ssd_guard.scoring.callstats.CallStats`: the answer check, every regeneration's
answer check, the document checks (retrieved documents, tool outputs). Targets:

==========================  ==============================================
path                        prefills of the base model per guarded call
==========================  ==============================================
``Guard.run`` / ``arun``    1 (also with retrieval and two regenerations)
``SSDGuard.wrap(model)``    1
the callback handler        1
the agent middleware        1 (prompt, tool output, answers and retries)
``GuardedLocalModel``       0 extra: one prefill per generation, its own
==========================  ==============================================

A real :class:`SSDScorer` over the tiny random LM (``tests/helpers/tiny.py``); the answering
chat models are fakes, so every counted pass is the guard's. A pass counts when the base
model runs over more than one token (a decode step runs over one).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from helpers.artifacts import LAYER, QUESTIONS, _build_artifact
from helpers.langchain import CountingChat, tool_call
from helpers.local import PrefillCounter
from helpers.prefill import _policy
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from structlog.testing import capture_logs

from ssd_guard.cache import MemoryCache
from ssd_guard.guard import CallStats, Guard
from ssd_guard.integrations.langchain import SSDGuard
from ssd_guard.local import GuardedLocalModel
from ssd_guard.policy import Policy

RETRIEVE = Policy.from_yaml_text(
    """
version: 1
name: count-retrieve
default_action: allow
rules:
  - name: always-retrieve
    scope: prompt
    when: {entropy: {gt: -1000000000}}
    action: retrieve
    k: 2
  - {name: every-answer, scope: answer, when: {loglik: {lt: 1000000000}}, action: log_only}
"""
)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, tiny_lm, minilm):
    from ssd_guard.scoring.ssd import SSDScorer

    path = _build_artifact(tmp_path_factory.mktemp("count-artifact"), tiny_lm, layer=LAYER)
    return SSDScorer.load(path, lm=tiny_lm, embedder=minilm, batch_size=4)


class Counted:
    """Counts the scorer's base-model prefills inside a ``with`` block."""

    def __init__(self, scorer: Any) -> None:
        self.model = scorer.encoder.model
        self.count = 0

    def __enter__(self) -> Counted:
        self._counter = PrefillCounter(self.model)
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = self._counter.count
        self._counter.close()


def _guard(scorer: Any, policy: Policy, **kw: Any) -> Guard:
    return Guard(scorer, policy, cache=MemoryCache(), **kw)


# --------------------------------------------------------------------------------------
# Guard.run / arun
# --------------------------------------------------------------------------------------
def test_guard_run_one_prefill_with_two_regenerations(scorer) -> None:
    guard = _guard(scorer, _policy("reject_answer", max_regenerations=2))
    answers = iter(["Lima", "Paris", "Rome"])
    with Counted(scorer) as c, capture_logs() as logs:
        res = guard.run(QUESTIONS[0], lambda p, temperature=None: next(answers))
    assert res.generations == 3 and res.abstained  # every answer rejected, then abstained
    assert [e["scope"] for e in logs if "scope" in e] == ["prompt", "answer", "answer", "answer"]
    assert c.count == 1  # was 2 + 1 per regeneration (= 4 here)
    assert res.stats is not None and res.stats.forwards == 1


def test_guard_arun_one_prefill(scorer) -> None:
    guard = _guard(scorer, _policy("reject_answer", max_regenerations=1))

    async def generate(p: str, temperature: float | None = None) -> str:
        return "Lima"

    with Counted(scorer) as c:
        res = asyncio.run(guard.arun(QUESTIONS[1], generate, deterministic=False))
    assert res.generations == 2 and c.count == 1


def test_guard_run_with_retrieval_one_prefill(scorer) -> None:
    docs = ["Lima is the capital of Peru.", "Peru is in South America."]
    guard = _guard(scorer, RETRIEVE, retriever=lambda q: docs)
    with Counted(scorer) as c, capture_logs() as logs:
        res = guard.run(QUESTIONS[0], lambda p: "Lima")
    assert res.documents == docs and not res.abstained
    assert [(e["scope"], e.get("after_retrieval")) for e in logs if "scope" in e] == [
        ("prompt", None),
        ("document", None),
        ("document", None),
        ("prompt", True),
        ("answer", None),
    ]
    assert c.count == 1  # the question only: documents and answer use its state


def test_prepare_and_complete_share_the_call_statistics(scorer) -> None:
    guard = _guard(scorer, _policy())
    stats = CallStats()
    with Counted(scorer) as c:
        res = guard.prepare(QUESTIONS[2], stats=stats)
        assert res.stats is stats and stats.forwards == 1
        guard.complete(res, lambda p: "Mars")
        guard.check_answer(QUESTIONS[2], "Venus", stats=stats)  # same call, later check
    assert c.count == 1


def test_a_check_without_call_statistics_runs_its_own_prefill(scorer) -> None:
    # Two separate calls (no shared CallStats, no cache): one prefill each.
    guard = _guard(scorer, _policy())
    with Counted(scorer) as c:
        guard.check_prompt(QUESTIONS[3])
        guard.check_answer(QUESTIONS[3], "hello")
    assert c.count == 2


# --------------------------------------------------------------------------------------
# LangChain: wrap(), the callback handler, the middleware
# --------------------------------------------------------------------------------------
def test_wrap_one_prefill_per_call(scorer) -> None:
    handler = SSDGuard(scorer, _policy("reject_answer", max_regenerations=2), cache=MemoryCache())
    model = CountingChat("Lima")
    with Counted(scorer) as c:
        out = handler.wrap(model).invoke([HumanMessage(QUESTIONS[0])])
    assert model.calls == 3 and out.response_metadata["ssd_guard"]["abstained"]
    assert c.count == 1


def test_wrap_stream_one_prefill_per_call(scorer) -> None:
    handler = SSDGuard(scorer, _policy("reject_answer", max_regenerations=1), cache=MemoryCache())
    with Counted(scorer) as c:
        chunks = list(handler.wrap(CountingChat("Lima city")).stream(QUESTIONS[1]))
    assert chunks and c.count == 1


def test_callback_one_prefill_per_call(scorer) -> None:
    handler = SSDGuard(scorer, _policy(), cache=MemoryCache())
    model = CountingChat("Lima")
    with Counted(scorer) as c, capture_logs() as logs:
        model.invoke(QUESTIONS[0], config={"callbacks": [handler]})
    assert [e["scope"] for e in logs if "scope" in e] == ["prompt", "answer"]
    assert c.count == 1


def test_callback_async_one_prefill_per_call(scorer) -> None:
    handler = SSDGuard(scorer, _policy(), cache=MemoryCache())
    with Counted(scorer) as c:
        asyncio.run(CountingChat("Lima").ainvoke(QUESTIONS[1], config={"callbacks": [handler]}))
    assert c.count == 1


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return "Lima is the capital of Peru."


def test_middleware_one_prefill_per_turn(scorer) -> None:
    from langchain.agents import create_agent

    handler = SSDGuard(scorer, _policy("reject_answer", max_regenerations=1), cache=MemoryCache())
    model = CountingChat(tool_call("lookup"), "Lima", "Lima city")
    agent = create_agent(model, tools=[lookup], middleware=[handler.middleware()])
    with Counted(scorer) as c, capture_logs() as logs:
        out = agent.invoke({"messages": [HumanMessage(QUESTIONS[0])]})
    scopes = [e["scope"] for e in logs if "scope" in e]
    # prompt (before_model), the tool output, two answers (the first one rejected)
    assert scopes == ["prompt", "document", "answer", "answer"]
    assert model.calls == 3 and out["messages"][-1].content == "ABSTAIN"
    assert c.count == 1


def test_middleware_async_one_prefill_per_turn(scorer) -> None:
    from langchain.agents import create_agent

    handler = SSDGuard(scorer, _policy(), cache=MemoryCache())
    agent = create_agent(CountingChat("Lima"), tools=[lookup], middleware=[handler.middleware()])
    with Counted(scorer) as c:
        asyncio.run(agent.ainvoke({"messages": [HumanMessage(QUESTIONS[2])]}))
    assert c.count == 1


# --------------------------------------------------------------------------------------
# GuardedLocalModel: zero extra passes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer_action", ["log_only", "reject_answer"])
def test_local_model_adds_no_pass(scorer, answer_action: str) -> None:
    guard = _guard(scorer, _policy(answer_action, max_regenerations=2))
    local = GuardedLocalModel(guard, max_new_tokens=3, seed=0)
    with Counted(scorer) as guarded:
        res = local.invoke(QUESTIONS[0])
    # Unguarded: the same number of generations, each one prefill.
    with Counted(scorer) as unguarded:
        for _ in range(res.generations):
            local.generate(QUESTIONS[0])
    assert res.generations == (1 if answer_action == "log_only" else 3)
    assert guarded.count == unguarded.count == res.generations  # 0 extra
    assert res.stats is not None and res.stats.forwards == 0  # no truncated prefill at all
