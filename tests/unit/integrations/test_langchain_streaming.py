"""A stream never shows an answer the guard has not let through.

When an answer rule can block, ``wrap().stream()`` buffers the model's chunks until the
answer check passes, the agent middleware keeps LangGraph's ``stream_mode="messages"``
from streaming draft tokens, and the callback (which cannot hold anything back) refuses
to stream. Without such a rule, tokens flow as the model makes them.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers.guard import POLICY_YAML, make_policy, make_scorer
from helpers.langchain import CountingChat, agent_for, handler, search, tool_call
from langchain_core.messages import AIMessageChunk, HumanMessage

from ssd_guard.integrations.langchain import GuardStreamingError, SSDGuard, answer_can_block

#: The test policy with its answer rule turned into log_only: nothing can stop an answer.
NO_ANSWER_BLOCK = POLICY_YAML.replace(
    "action: reject_answer\n    max_regenerations: 2", "action: log_only"
)


def open_guard() -> SSDGuard:
    return SSDGuard(make_scorer(), make_policy(NO_ANSWER_BLOCK))


def text(chunks: list[Any]) -> str:
    return "".join(str(c.content) for c in chunks)


# --------------------------------------------------------------------------------------
# wrap(): buffer, check, release
# --------------------------------------------------------------------------------------
def test_wrap_stream_holds_chunks_until_the_answer_check_passes() -> None:
    model = CountingChat("bad answer", "good answer")
    guarded = handler().wrap(model)
    received: list[AIMessageChunk] = []
    produced_at_first_chunk = None
    for chunk in guarded.stream("easy"):
        if produced_at_first_chunk is None:
            produced_at_first_chunk = list(model.produced)
        received.append(chunk)
    # nothing was released before both drafts were made and the second one accepted
    assert produced_at_first_chunk == ["bad", "answer", "good", "answer"]
    assert text(received) == "good answer"
    assert all("bad" not in str(c.content) for c in received)
    assert len(received) >= 2  # released as the model streamed them, not merged
    meta = received[-1].response_metadata["ssd_guard"]
    assert meta["rejected"] == ["bad answer"] and meta["action"] == "allow"


async def test_wrap_astream_holds_chunks_until_the_answer_check_passes() -> None:
    model = CountingChat("bad answer", "good answer")
    received = [c async for c in handler().wrap(model).astream("easy")]
    assert text(received) == "good answer" and model.calls == 2
    assert all("bad" not in str(c.content) for c in received)
    assert received[-1].response_metadata["ssd_guard"]["rejected"] == ["bad answer"]


def test_wrap_stream_of_a_rejected_answer_is_only_the_abstention() -> None:
    model = CountingChat("bad answer")
    received = list(handler().wrap(model).stream("easy"))
    assert [c.content for c in received] == ["ABSTAIN"]
    assert model.calls == 3  # the first answer and two regenerations, none shown


def test_wrap_stream_passes_chunks_through_when_no_answer_rule_can_act() -> None:
    model = CountingChat("one two three four")
    guarded = open_guard().wrap(model)
    produced_at_first_chunk = None
    received = []
    for chunk in guarded.stream("easy"):
        if produced_at_first_chunk is None:
            produced_at_first_chunk = len(model.produced)
        received.append(chunk)
    assert produced_at_first_chunk is not None and produced_at_first_chunk < 4  # streaming
    assert text(received) == "one two three four"
    assert received[-1].response_metadata["ssd_guard"]["action"] == "allow"


def test_wrap_invoke_tags_the_inner_call_nostream_only_when_holding() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Tags(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tags: list[list[str]] = []

        def on_chat_model_start(self, serialized, messages, *, tags=None, **kwargs):  # type: ignore[no-untyped-def]
            self.tags.append(list(tags or []))

    spy = Tags()
    handler().wrap(CountingChat("good answer")).invoke("easy", config={"callbacks": [spy]})
    open_guard().wrap(CountingChat("good answer")).invoke("easy", config={"callbacks": [spy]})
    assert ["nostream" in t for t in spy.tags] == [True, False]


def test_answer_can_block_follows_rule_filters() -> None:
    tagged = POLICY_YAML.replace("scope: answer\n", "scope: answer\n    tags: [strict]\n")
    guard = SSDGuard(make_scorer(), make_policy(tagged)).guard
    assert not answer_can_block(guard, ["prod"])
    assert answer_can_block(guard, ["prod", "strict"])
    assert answer_can_block(handler().guard)
    assert not answer_can_block(open_guard().guard)


# --------------------------------------------------------------------------------------
# The callback cannot hold a stream: it refuses to let one through
# --------------------------------------------------------------------------------------
def test_callback_refuses_to_stream_when_an_answer_rule_can_act() -> None:
    model = CountingChat("bad answer")
    stream = model.stream("easy", config={"callbacks": [handler()]})
    with pytest.raises(GuardStreamingError, match=r"guard\.wrap\(model\)"):
        next(stream)  # raised before the first chunk is handed out
    assert model.produced == ["bad"]
    # invoke is unaffected: the answer is checked before it is returned
    good = CountingChat("good answer").invoke("easy", config={"callbacks": [handler()]})
    assert good.content == "good answer"


async def test_callback_refuses_to_astream_too() -> None:
    model = CountingChat("good answer")
    with pytest.raises(GuardStreamingError):
        async for _ in model.astream("easy", config={"callbacks": [handler()]}):
            pytest.fail("a chunk was streamed before the answer check")


def test_callback_streams_when_no_answer_rule_can_act() -> None:
    chunks = list(CountingChat("good answer").stream("easy", config={"callbacks": [open_guard()]}))
    assert text(chunks) == "good answer"


# --------------------------------------------------------------------------------------
# Agent: stream_mode="messages"
# --------------------------------------------------------------------------------------
def streamed(agent: Any, prompt: str) -> list[Any]:
    return [
        msg
        for msg, _meta in agent.stream({"messages": [HumanMessage(prompt)]}, stream_mode="messages")
    ]


def test_agent_messages_stream_never_shows_a_rejected_draft() -> None:
    model = CountingChat(tool_call("search"), "bad answer", "good answer")
    msgs = streamed(agent_for(model, handler(), [search]), "easy")
    contents = [str(m.content) for m in msgs]
    assert model.calls == 3 and model.produced.count("bad") == 1  # the draft was made...
    assert not any("bad" in c for c in contents)  # ...and never shown
    assert contents[-1] == "good answer"
    assert not any(isinstance(m, AIMessageChunk) for m in msgs)  # held: whole messages
    assert msgs[-1].response_metadata["ssd_guard"]["rejected"] == ["bad answer"]


async def test_agent_messages_astream_never_shows_a_rejected_draft() -> None:
    model = CountingChat("bad answer", "good answer")
    agent = agent_for(model, handler(), [search])
    msgs = [
        m
        async for m, _ in agent.astream(
            {"messages": [HumanMessage("easy")]}, stream_mode="messages"
        )
    ]
    assert [str(m.content) for m in msgs] == ["good answer"] and model.calls == 2


def test_agent_messages_stream_of_an_abstention() -> None:
    model = CountingChat("good answer")
    msgs = streamed(agent_for(model, handler()), "hard")
    assert [m.content for m in msgs] == ["ABSTAIN"] and model.calls == 0


def test_agent_messages_stream_tokens_when_no_answer_rule_can_act() -> None:
    model = CountingChat("one two three")
    msgs = streamed(agent_for(model, open_guard()), "easy")
    tokens = [m for m in msgs if isinstance(m, AIMessageChunk)]
    assert len(tokens) >= 3 and text(tokens) == "one two three"
