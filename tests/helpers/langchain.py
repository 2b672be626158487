"""Shared test helpers (moved from test_langchain.py; used by several test modules)."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_core.tools import tool

from helpers.guard import (
    GOOD_DOC,
    POISON_DOC,
    make_policy,
    make_scorer,
)
from ssd_guard.integrations.langchain import SSDGuard


class CountingChat(GenericFakeChatModel):
    """Replies from a list (the last one repeats); records every input it got.

    It has a ``temperature`` setting, as real chat models do, so the guard regenerates a
    rejected answer with it (``temperatures`` records each call's)."""

    replies: list[Any]
    inputs: list[list[Any]]
    produced: list[str]
    temperature: float | None = None
    temperatures: list[float | None]

    def __init__(self, *replies: Any) -> None:
        super().__init__(
            messages=iter(()), replies=list(replies), inputs=[], produced=[], temperatures=[]
        )

    def bind_tools(self, tools: Any, **kwargs: Any) -> CountingChat:
        return self

    def _next(self) -> AIMessage:
        reply = self.replies[min(len(self.inputs) - 1, len(self.replies) - 1)]
        return reply if isinstance(reply, AIMessage) else AIMessage(content=reply)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
        from langchain_core.outputs import ChatGeneration, ChatResult

        self.inputs.append(list(messages))
        self.temperatures.append(kwargs.get("temperature"))
        return ChatResult(generations=[ChatGeneration(message=self._next())])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
        """Word by word (``self.produced`` records each chunk as it is made)."""
        from langchain_core.outputs import ChatGenerationChunk

        self.inputs.append(list(messages))
        reply = self._next()
        words = str(reply.content).split(" ")
        for i, word in enumerate(words):
            self.produced.append(word)
            chunk = AIMessageChunk(content=word if i == 0 else " " + word)
            yield ChatGenerationChunk(message=chunk)
        if reply.tool_calls:
            chunk = AIMessageChunk(
                content="",
                tool_call_chunks=[
                    {"name": tc["name"], "args": json.dumps(tc["args"]), "id": tc["id"], "index": j}
                    for j, tc in enumerate(reply.tool_calls)
                ],
            )
            yield ChatGenerationChunk(message=chunk)

    @property
    def calls(self) -> int:
        return len(self.inputs)

    def last_human(self) -> str:
        return next(m.content for m in reversed(self.inputs[-1]) if isinstance(m, HumanMessage))


def handler(**kw: Any) -> SSDGuard:
    return SSDGuard(make_scorer(), make_policy(), **kw)


# --------------------------------------------------------------------------------------
# Agent middleware
# --------------------------------------------------------------------------------------
@tool
def search(query: str) -> str:
    """Search the web."""
    return POISON_DOC


@tool
def lookup(query: str) -> str:
    """Look something up."""
    return GOOD_DOC


def tool_call(name: str) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": {"query": "x"}, "id": "c1"}])


def agent_for(model: CountingChat, guard: SSDGuard, tools: list[Any] | None = None) -> Any:
    from langchain.agents import create_agent

    return create_agent(model, tools=tools or [search, lookup], middleware=[guard.middleware()])
