"""LangChain integration: callback handlers, the wrap() Runnable and the agent middleware."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.fakes import AUDIT_CONTRACT_FIELDS
from helpers.guard import (
    GOOD_DOC,
    POISON_DOC,
    POLICY_YAML,
    Retr,
    decisions_of,
    make_policy,
    make_scorer,
)
from helpers.langchain import CountingChat, agent_for, handler, lookup, search, tool_call  # noqa: F401
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from structlog.testing import capture_logs

from ssd_guard.errors import GuardBlockedError
from ssd_guard.guard import Guard, format_context
from ssd_guard.integrations import langchain as lc
from ssd_guard.integrations.langchain import AsyncSSDGuard, SSDGuard


# --------------------------------------------------------------------------------------
# Callback handlers
# --------------------------------------------------------------------------------------
class RunIds(BaseCallbackHandler):
    def __init__(self) -> None:
        self.run_ids: list[str] = []

    def on_chat_model_start(self, serialized, messages, *, run_id, **kwargs):  # type: ignore[no-untyped-def]
        self.run_ids.append(str(run_id))


def test_handler_logs_prompt_and_answer_with_langchain_run_ids() -> None:
    guard, spy = handler(), RunIds()
    model = CountingChat("good answer")
    with capture_logs() as logs:
        out = model.invoke("easy", config={"callbacks": [guard, spy]})
    assert out.content == "good answer"
    events = decisions_of(logs)
    assert [(e["scope"], e["action"], e["step"]) for e in events] == [
        ("prompt", "allow", 1),
        ("answer", "allow", 2),
    ]
    assert [e["run_id"] for e in events] == spy.run_ids * 2
    for ev in events:
        assert ev.keys() >= AUDIT_CONTRACT_FIELDS
        assert ev["hidden_state_source"] == "proxy:fake/base-model"
        assert ev["guarded_model"] == "CountingChat"
    assert not guard._pending  # per-run bookkeeping is released


def test_handler_keeps_parent_run_id_inside_a_chain() -> None:
    guard = handler()
    model = CountingChat("good answer")
    chain = RunnableLambda(lambda q: q) | model
    with capture_logs() as logs:
        chain.invoke("easy", config={"callbacks": [guard]})
    events = decisions_of(logs)
    assert events and all(e["parent_run_id"] for e in events)
    assert events[0]["parent_run_id"] != events[0]["run_id"]


def test_handler_blocking_prompt_raises_and_model_is_not_called() -> None:
    guard = handler()
    assert guard.raise_error
    model = CountingChat("good answer")
    with capture_logs() as logs, pytest.raises(GuardBlockedError) as info:
        model.invoke("hard", config={"callbacks": [guard]})
    assert info.value.action == "abstain" and info.value.rule == "risky"
    assert str(info.value) == "ABSTAIN" and info.value.scores == {"entropy": 2.9}
    assert model.calls == 0
    assert len(decisions_of(logs)) == 1
    assert not guard._pending


def test_handler_rejected_answer_raises() -> None:
    model = CountingChat("bad answer")
    with pytest.raises(GuardBlockedError) as info:
        model.invoke("easy", config={"callbacks": [handler()]})
    assert info.value.action == "reject_answer"


def test_handler_non_blocking_policy_only_logs() -> None:
    yaml = POLICY_YAML.replace("action: abstain", "action: log_only").replace(
        "action: reject_answer\n    max_regenerations: 2", "action: log_only"
    )
    guard = SSDGuard(make_scorer(), make_policy(yaml))
    assert guard.raise_error is False
    model = CountingChat("bad answer")
    with capture_logs() as logs:
        assert model.invoke("hard", config={"callbacks": [guard]}).content == "bad answer"
    assert [e["action"] for e in decisions_of(logs)] == ["log_only", "log_only"]


def test_handler_on_plain_llm_and_unchecked_streaming() -> None:
    from langchain_core.language_models.fake import FakeListLLM

    guard = handler(stream_unchecked=True)  # drafts may be shown before the answer check
    with capture_logs() as logs:
        FakeListLLM(responses=["good answer"]).invoke("easy", config={"callbacks": [guard]})
        chunks = list(CountingChat("good answer").stream("easy", config={"callbacks": [guard]}))
    assert "".join(str(c.content) for c in chunks) == "good answer"
    assert [e["scope"] for e in decisions_of(logs)] == ["prompt", "answer"] * 2


def test_handler_skips_tool_call_answers() -> None:
    call = AIMessage(content="", tool_calls=[{"name": "search", "args": {}, "id": "c1"}])
    with capture_logs() as logs:
        CountingChat(call).invoke("easy", config={"callbacks": [handler()]})
    assert [e["scope"] for e in decisions_of(logs)] == ["prompt"]


async def test_async_handler_raises_through_ainvoke() -> None:
    guard = AsyncSSDGuard(make_scorer(), make_policy())
    model = CountingChat("good answer")
    with pytest.raises(GuardBlockedError):
        await model.ainvoke("hard", config={"callbacks": [guard]})
    assert model.calls == 0
    with capture_logs() as logs:
        out = await model.ainvoke("easy", config={"callbacks": [guard]})
    assert out.content == "good answer" and len(decisions_of(logs)) == 2


async def test_sync_handler_works_with_ainvoke() -> None:
    model = CountingChat("good answer")
    with pytest.raises(GuardBlockedError):
        await model.ainvoke("hard", config={"callbacks": [handler()]})


# --------------------------------------------------------------------------------------
# wrap()
# --------------------------------------------------------------------------------------
def test_wrap_abstain_returns_message_without_calling_model() -> None:
    model = CountingChat("good answer")
    guarded = handler().wrap(model)
    with capture_logs() as logs:
        out = guarded.invoke("hard")
    assert isinstance(out, AIMessage) and out.content == "ABSTAIN"
    assert model.calls == 0
    meta = out.response_metadata["ssd_guard"]
    assert meta["action"] == "abstain" and meta["rule"] == "risky" and meta["abstained"]
    assert len(decisions_of(logs)) == 1


def test_wrap_retrieve_puts_documents_in_the_last_human_message() -> None:
    model = CountingChat("good answer")
    scorer = make_scorer()
    guard = SSDGuard(scorer, make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))
    out = guard.wrap(model).invoke([SystemMessage("be brief"), HumanMessage("medium")])
    assert out.content == "good answer"
    augmented = format_context("medium", [GOOD_DOC])
    assert model.last_human() == augmented
    assert isinstance(model.inputs[0][0], SystemMessage)
    assert scorer.prompts_scored == ["medium"]  # the question only, never the context prompt
    meta = out.response_metadata["ssd_guard"]
    assert meta["documents"] == 1 and meta["dropped"] == 1


def test_wrap_rejects_and_regenerates() -> None:
    model = CountingChat("bad answer", "good answer")
    out = handler().wrap(model).invoke("easy")
    assert model.calls == 2 and out.content == "good answer"
    assert out.response_metadata["ssd_guard"]["rejected"] == ["bad answer"]
    model = CountingChat("bad answer")
    out = handler().wrap(model).invoke("easy")
    assert model.calls == 3 and out.content == "ABSTAIN"


async def test_wrap_ainvoke_batch_abatch_stream_astream() -> None:
    guarded = handler().wrap(CountingChat("good answer"))
    assert (await guarded.ainvoke("easy")).content == "good answer"
    assert [m.content for m in guarded.batch(["easy", "hard"])] == ["good answer", "ABSTAIN"]
    assert [m.content for m in await guarded.abatch(["hard", "easy"])] == [
        "ABSTAIN",
        "good answer",
    ]
    chunks = list(guarded.stream("easy"))  # the model's chunks, released once checked
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == "good answer"
    assert chunks[-1].response_metadata["ssd_guard"]["action"] == "allow"
    achunks = [c async for c in guarded.astream("hard")]
    assert [c.content for c in achunks] == ["ABSTAIN"]


def test_wrap_events_use_the_runnable_run_id() -> None:
    guarded = handler().wrap(CountingChat("good answer"))
    with capture_logs() as logs:
        out = guarded.invoke("easy", config={"tags": ["prod"], "run_name": "qa"})
    events = decisions_of(logs)
    assert len(events) == 2
    assert {e["run_id"] for e in events} == {out.response_metadata["ssd_guard"]["run_id"]}
    assert events[0]["tags"] == ["prod"] and events[0]["run_name"] == "qa"


def test_wrap_in_a_chain() -> None:
    chain = RunnableLambda(lambda d: d["q"]) | handler().wrap(CountingChat("good answer"))
    assert chain.invoke({"q": "hard"}).content == "ABSTAIN"


# --------------------------------------------------------------------------------------
# hidden_state_source
# --------------------------------------------------------------------------------------
def test_hidden_state_source_for_api_and_local_models(tiny_lm) -> None:
    import transformers
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

    pipe = transformers.pipeline(
        "text-generation",
        model=tiny_lm.model,
        tokenizer=tiny_lm.tokenizer,
        max_new_tokens=3,
        do_sample=False,
    )
    chat = ChatHuggingFace(
        llm=HuggingFacePipeline(pipeline=pipe), tokenizer=tiny_lm.tokenizer, model_id="tiny"
    )
    assert lc.local_hf_model(chat) is tiny_lm.model
    assert lc.local_hf_model(CountingChat("x")) is None

    other = make_scorer()  # a scorer on another base model: the scorer is a proxy
    assert lc.resolve_hidden_state_source(chat, other) == ("proxy:fake/base-model", "tiny")
    same = make_scorer()
    same.encoder = SimpleNamespace(model=tiny_lm.model)  # the scorer reads this very model
    assert lc.resolve_hidden_state_source(chat, same) == ("guarded-model", "tiny")
    from ssd_guard.models import model_fingerprint

    by_weights = make_scorer()
    by_weights.manifest = SimpleNamespace(
        base_model=SimpleNamespace(fingerprint=model_fingerprint(tiny_lm.model))
    )
    assert lc.resolve_hidden_state_source(chat, by_weights)[0] == "guarded-model"

    # end to end through the real ChatHuggingFace pipeline
    if tiny_lm.tokenizer.chat_template is None:
        tiny_lm.tokenizer.chat_template = (
            "{% for m in messages %}{{ m['content'] }}\n{% endfor %}Answer:"
        )
    guarded = SSDGuard(guard=Guard(same, make_policy())).wrap(chat)
    with capture_logs() as logs:
        out = guarded.invoke("easy")
    assert isinstance(out, AIMessage)
    events = decisions_of(logs)
    assert [e["hidden_state_source"] for e in events] == ["guarded-model"] * len(events)
    assert events[0]["guarded_model"] == "tiny"


def test_middleware_abstain_ends_the_run_without_calling_the_model() -> None:
    model = CountingChat("good answer")
    with capture_logs() as logs:
        out = agent_for(model, handler()).invoke({"messages": [HumanMessage("hard")]})
    assert model.calls == 0
    last = out["messages"][-1]
    assert isinstance(last, AIMessage) and last.content == "ABSTAIN"
    assert last.response_metadata["ssd_guard"]["action"] == "abstain"
    assert [e["action"] for e in decisions_of(logs)] == ["abstain"]


def test_middleware_flags_poisoned_tool_output_and_rejects_bad_answers() -> None:
    model = CountingChat(tool_call("search"), "bad answer", "good answer")
    with capture_logs() as logs:
        out = agent_for(model, handler()).invoke({"messages": [HumanMessage("easy")]})
    msgs = out["messages"]
    tool_msg = next(m for m in msgs if m.type == "tool")
    assert POISON_DOC not in tool_msg.content and "withheld" in tool_msg.content
    assert tool_msg.response_metadata["ssd_guard"]["action"] == "flag_poisoned"
    assert model.calls == 3  # tool call, bad answer (rejected), good answer
    assert all(POISON_DOC not in str(m.content) for m in model.inputs[-1])
    assert msgs[-1].content == "good answer"
    events = decisions_of(logs)
    assert [(e["scope"], e["action"]) for e in events] == [
        ("prompt", "allow"),
        ("document", "flag_poisoned"),
        ("answer", "reject_answer"),
        ("answer", "allow"),
    ]
    # one LangChain run per hook (before_model, the tool, the model call): the answer
    # checks of one model call share it, with their steps
    prompt_run, doc_run, answer_runs = (
        events[0]["run_id"],
        events[1]["run_id"],
        {e["run_id"] for e in events[2:]},
    )
    assert len({prompt_run, doc_run, *answer_runs}) == 3 and len(answer_runs) == 1
    assert [e["step"] for e in events] == [1, 1, 1, 2]


def test_middleware_quarantine_keeps_the_tool_output_aside() -> None:
    policy = make_policy(POLICY_YAML.replace("mode: drop", "mode: quarantine"))
    model = CountingChat(tool_call("search"), "good answer")
    out = agent_for(model, SSDGuard(make_scorer(), policy)).invoke(
        {"messages": [HumanMessage("easy")]}
    )
    tool_msg = next(m for m in out["messages"] if m.type == "tool")
    assert tool_msg.artifact == {"ssd_guard_quarantined": POISON_DOC}
    assert "withheld" in tool_msg.content


def test_middleware_keeps_clean_tool_output() -> None:
    model = CountingChat(tool_call("lookup"), "good answer")
    out = agent_for(model, handler()).invoke({"messages": [HumanMessage("easy")]})
    assert next(m for m in out["messages"] if m.type == "tool").content == GOOD_DOC


def test_middleware_retrieve_augments_every_model_call_of_the_turn() -> None:
    model = CountingChat(tool_call("lookup"), "good answer")
    guard = SSDGuard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC, POISON_DOC]))
    out = agent_for(model, guard).invoke({"messages": [HumanMessage("medium")]})
    augmented = format_context("medium", [GOOD_DOC])
    assert [next(m.content for m in i if m.type == "human") for i in model.inputs] == [
        augmented,
        augmented,
    ]
    assert out["messages"][0].content == "medium"  # the conversation itself is unchanged
    assert out["messages"][-1].content == "good answer"


def test_middleware_regeneration_exhausted_abstains() -> None:
    model = CountingChat("bad answer")
    out = agent_for(model, handler()).invoke({"messages": [HumanMessage("easy")]})
    assert model.calls == 3 and out["messages"][-1].content == "ABSTAIN"


async def test_middleware_async_agent() -> None:
    model = CountingChat(tool_call("search"), "bad answer", "good answer")
    agent = agent_for(model, handler())
    out = await agent.ainvoke({"messages": [HumanMessage("easy")]})
    assert out["messages"][-1].content == "good answer" and model.calls == 3
    assert "withheld" in next(m for m in out["messages"] if m.type == "tool").content
    model = CountingChat("good answer")
    out = await agent_for(model, handler()).ainvoke({"messages": [HumanMessage("hard")]})
    assert model.calls == 0 and out["messages"][-1].content == "ABSTAIN"


def test_middleware_hooks_called_directly() -> None:
    from langchain.agents.middleware import ModelRequest, ModelResponse

    mw = handler().middleware()
    model = CountingChat("good answer")
    calls: list[Any] = []

    def call_model(req: ModelRequest) -> ModelResponse:
        calls.append(req)
        return ModelResponse(result=[model.invoke(req.messages)])

    msgs = [HumanMessage("hard", id="h1")]
    req = ModelRequest(model=model, messages=msgs, state={"messages": msgs})
    out = mw.wrap_model_call(req, call_model)
    assert isinstance(out, AIMessage) and out.content == "ABSTAIN" and calls == []

    msgs = [HumanMessage("easy", id="h2")]
    update = mw.before_model({"messages": msgs}, None)
    assert update is not None and "jump_to" not in update
    state = {"messages": msgs, **update}
    resp = mw.wrap_model_call(ModelRequest(model=model, messages=msgs, state=state), call_model)
    assert len(calls) == 1 and resp.result[-1].content == "good answer"
    assert resp.result[-1].response_metadata["ssd_guard"]["action"] == "allow"

    update = mw.before_model({"messages": [HumanMessage("hard", id="h3")]}, None)
    assert update["jump_to"] == "end" and update["messages"][0].content == "ABSTAIN"


def test_middleware_import_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ssd_guard.integrations.langchain.middleware")
    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)
    with pytest.raises(ImportError, match=r"ssd-guard\[langchain\]"):
        handler().middleware()


def test_integrations_package_is_lazy() -> None:
    import ssd_guard.integrations as integrations

    assert integrations.SSDGuard is SSDGuard
    assert integrations.SSDGuardMiddleware.__name__ == "SSDGuardMiddleware"
