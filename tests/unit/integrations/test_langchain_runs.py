"""Every path audits LangChain's own run ids, tags and
metadata, and the async handler never loses a block."""

from __future__ import annotations

import inspect
import io
import json
import logging
from typing import Any

import pytest
import structlog
from helpers.guard import decisions_of, make_policy, make_scorer
from helpers.langchain import CountingChat, handler, search, tool_call
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableLambda
from structlog.testing import capture_logs

from ssd_guard.audit import close_audit, configure_audit
from ssd_guard.errors import GuardBlockedError
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.integrations.langchain import AsyncSSDGuard, LocalGuardedChatModel

CONFIG: Any = {"tags": ["prod"], "metadata": {"user": "u1", "tenant": "acme"}}


class Runs(BaseCallbackHandler):
    """Records every chain / chat-model run LangChain starts: id -> (name, parent, tags)."""

    def __init__(self) -> None:
        self.runs: dict[str, tuple[str, str | None, list[str]]] = {}

    def _add(self, name: Any, run_id: Any, parent_run_id: Any, tags: Any) -> None:
        parent = str(parent_run_id) if parent_run_id else None
        self.runs[str(run_id)] = (str(name), parent, list(tags or []))

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, tags=None, **kw):  # type: ignore[no-untyped-def]
        self._add(kw.get("name"), run_id, parent_run_id, tags)

    def on_chat_model_start(
        self, serialized, messages, *, run_id, parent_run_id=None, tags=None, **kw
    ):  # type: ignore[no-untyped-def]
        self._add("chat", run_id, parent_run_id, tags)

    def name(self, run_id: str | None) -> str | None:
        return self.runs[run_id][0] if run_id in self.runs else None

    def named(self, name: str) -> list[str]:
        return [rid for rid, (n, _, _) in self.runs.items() if n == name]


def events_with_context(fn: Any) -> list[dict[str, Any]]:
    """The guard.decision events of ``fn()``, with the bound context merged as the audit
    sink merges it (run metadata travels that way)."""
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        fn()
    return decisions_of(logs)


def assert_run_context(events: list[dict[str, Any]]) -> None:
    assert events
    for ev in events:
        assert ev["tags"] == ["prod"]  # the config's tags, none of LangChain's own
        assert ev["metadata"]["user"] == "u1" and ev["metadata"]["tenant"] == "acme"


# --------------------------------------------------------------------------------------
# Item 14: the callback
# --------------------------------------------------------------------------------------
def test_callback_audits_the_model_run_its_parent_tags_and_metadata() -> None:
    spy = Runs()
    chain = RunnableLambda(lambda q: q) | CountingChat("good answer")
    events = events_with_context(
        lambda: chain.invoke("easy", config={**CONFIG, "callbacks": [handler(), spy]})
    )
    (chat_run,) = spy.named("chat")
    assert {e["run_id"] for e in events} == {chat_run}
    assert {e["parent_run_id"] for e in events} == {spy.runs[chat_run][1]}
    assert spy.name(events[0]["parent_run_id"]) == "RunnableSequence"
    assert_run_context(events)


def test_audit_sink_writes_the_run_metadata() -> None:
    buf = io.StringIO()
    configure_audit(stream=buf)
    try:
        handler().wrap(CountingChat("good answer")).invoke("easy", config=CONFIG)
    finally:
        close_audit()
    lines = [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    assert [ev["scope"] for ev in lines] == ["prompt", "answer"]
    assert all(ev["metadata"] == CONFIG["metadata"] for ev in lines)
    assert all(ev["tags"] == ["prod"] for ev in lines)


# --------------------------------------------------------------------------------------
# Item 14: wrap()
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_wrap_audits_its_own_run_and_the_model_runs_are_its_children(mode: str) -> None:
    spy = Runs()
    guarded = handler().wrap(CountingChat("bad answer", "good answer"))
    chain = RunnableLambda(lambda q: q) | guarded
    cfg: Any = {**CONFIG, "callbacks": [spy]}
    run = (
        (lambda: chain.invoke("easy", config=cfg))
        if mode == "invoke"
        else (lambda: list(chain.stream("easy", config=cfg)))
    )
    events = events_with_context(run)
    (guard_run,) = spy.named("SSDGuard[CountingChat]")
    assert {e["run_id"] for e in events} == {guard_run}
    assert [e["step"] for e in events] == [1, 2, 3]
    assert {e["parent_run_id"] for e in events} == {spy.runs[guard_run][1]}
    assert spy.name(spy.runs[guard_run][1]) == "RunnableSequence"
    chats = spy.named("chat")
    assert len(chats) == 2 and all(spy.runs[c][1] == guard_run for c in chats)
    assert_run_context(events)


# --------------------------------------------------------------------------------------
# Item 14: the middleware
# --------------------------------------------------------------------------------------
def run_agent(sync: bool) -> tuple[list[dict[str, Any]], Runs]:
    import asyncio

    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    spy = Runs()
    model = CountingChat(tool_call("search"), "bad answer", "good answer")
    agent = create_agent(
        model, tools=[search], middleware=[handler().middleware()], checkpointer=InMemorySaver()
    )
    cfg: Any = {**CONFIG, "callbacks": [spy], "configurable": {"thread_id": "thread-1"}}
    state: Any = {"messages": [HumanMessage("easy")]}
    if sync:
        events = events_with_context(lambda: agent.invoke(state, config=cfg))
    else:
        events = events_with_context(lambda: asyncio.run(agent.ainvoke(state, config=cfg)))
    return events, spy


@pytest.mark.parametrize("sync", [True, False], ids=["invoke", "ainvoke"])
def test_middleware_audits_langchain_runs_not_the_thread_id(sync: bool) -> None:
    events, spy = run_agent(sync)
    assert [(e["scope"], e["action"]) for e in events] == [
        ("prompt", "allow"),
        ("document", "flag_poisoned"),
        ("answer", "reject_answer"),
        ("answer", "allow"),
    ]
    for ev in events:
        assert "thread-1" not in (ev["run_id"], ev["parent_run_id"])
        assert spy.name(ev["run_id"]) == "SSDGuard"  # a traced run of the guard's own
    parents = [spy.name(e["parent_run_id"]) for e in events]
    assert parents == ["SSDGuardMiddleware.before_model", "tools", "model", "model"]
    # the model calls of wrap_model_call are children of its SSDGuard run
    answer_run = events[-1]["run_id"]
    chats = [c for c in spy.named("chat") if spy.runs[c][1] == answer_run]
    assert len(chats) == 2
    assert_run_context(events)
    assert [e["metadata"]["langgraph_node"] for e in events] == [
        "SSDGuardMiddleware.before_model",
        "tools",
        "model",
        "model",
    ]


def test_middleware_hooks_outside_a_graph_still_get_run_ids() -> None:
    mw = handler().middleware()
    update = mw.before_model({"messages": [HumanMessage("easy", id="h1")]}, None)
    assert update is not None
    turn = update["ssd_guard_turn"]
    assert turn["run_id"] and turn["parent_run_id"] is None


# --------------------------------------------------------------------------------------
# Item 14: LocalGuardedChatModel is a traced run
# --------------------------------------------------------------------------------------
class FakeLocal:
    """Stands in for GuardedLocalModel (no model): records what the Runnable passed."""

    model_id = "fake/local"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def invoke(self, prompt: str, **kw: Any) -> GuardResult:
        self.calls.append({"prompt": prompt, **kw})
        return GuardResult(
            output="Paris",
            abstained=False,
            prompt=prompt,
            final_prompt=prompt,
            run_id=kw["run_id"],
            parent_run_id=kw["parent_run_id"],
            answer="Paris",
            raw="Paris",
        )

    async def ainvoke(self, prompt: str, **kw: Any) -> GuardResult:
        return self.invoke(prompt, **kw)


async def test_local_chat_model_is_a_traced_run_with_the_run_context() -> None:
    spy, local = Runs(), FakeLocal()
    chat = LocalGuardedChatModel(local, tags=["local"])
    out = chat.invoke([HumanMessage("Capital of France?")], config={**CONFIG, "callbacks": [spy]})
    amsg = await chat.ainvoke("Capital of France?", config={**CONFIG, "callbacks": [spy]})
    chunks = list(chat.stream("Capital of France?", config={**CONFIG, "callbacks": [spy]}))
    assert isinstance(out, AIMessage) and out.content == amsg.content == "Paris"
    assert [c.content for c in chunks] == ["Paris"]
    runs = spy.named("LocalGuardedChatModel[fake/local]")
    assert [c["run_id"] for c in local.calls] == runs
    for call in local.calls:
        assert call["tags"] == ["local", "prod"] and call["prompt"] == "Capital of France?"
    assert out.response_metadata["ssd_guard"]["run_id"] == runs[0]


# --------------------------------------------------------------------------------------
# Item 15: the async handler under a sync call
# --------------------------------------------------------------------------------------
def test_async_handler_blocks_a_sync_call_loudly(caplog: pytest.LogCaptureFixture) -> None:
    guard = AsyncSSDGuard(make_scorer(), make_policy())
    model = CountingChat("bad answer")
    with caplog.at_level(logging.WARNING), pytest.raises(GuardBlockedError) as info:
        model.invoke("hard", config={"callbacks": [guard]})
    assert info.value.action == "abstain" and model.calls == 0
    with pytest.raises(GuardBlockedError) as info:
        model.invoke("easy", config={"callbacks": [guard]})  # a rejected answer
    assert info.value.action == "reject_answer"
    assert "Error in callback coroutine" not in caplog.text
    assert not inspect.iscoroutinefunction(guard.on_chat_model_start)
    assert not inspect.iscoroutinefunction(guard.on_llm_end)


async def test_async_handler_still_blocks_async_calls() -> None:
    guard = AsyncSSDGuard(guard=Guard(make_scorer(), make_policy()))
    model = CountingChat("bad answer")
    with pytest.raises(GuardBlockedError):
        await model.ainvoke("hard", config={"callbacks": [guard]})
    with pytest.raises(GuardBlockedError):
        await model.ainvoke("easy", config={"callbacks": [guard]})
    assert model.calls == 1
