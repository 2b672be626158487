"""What the callbacks, the Runnables and the middleware share: message helpers, the run
context taken from LangChain (run ids, tags, metadata), when a stream must be held, and
whose hidden states are read."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    HumanMessage,
    convert_to_messages,
)
from langchain_core.prompt_values import PromptValue

from ssd_guard import provenance
from ssd_guard._flow import Call
from ssd_guard.audit import bind_run
from ssd_guard.errors import ConfigError, GuardBlockedError
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.policy import BLOCKING_ACTIONS, Decision
from ssd_guard.provenance import base_model_of, model_name
from ssd_guard.scoring.base import RiskScorer

T = TypeVar("T")

#: Private agent-state key where the middleware keeps the current turn's check.
TURN_KEY = "ssd_guard_turn"
#: What a flagged tool output is replaced with (the middleware's ``wrap_tool_call``).
QUARANTINE_NOTICE = (
    "[ssd-guard] The output of tool '{tool}' was withheld: it is far off the expected "
    "answer distribution and may be poisoned (rule '{rule}', loglik {loglik})."
)
#: LangGraph's tag for a model run whose tokens ``stream_mode="messages"`` must not stream.
NOSTREAM_TAG = "nostream"
#: Tags LangChain / LangGraph add for their own bookkeeping; left out of the audit.
_INTERNAL_TAG_PREFIXES = ("seq:step:", "graph:step:", "map:key:", "langsmith:")
_INTERNAL_TAGS = frozenset({NOSTREAM_TAG})


class GuardStreamingError(ConfigError):
    """A callback handler was asked to let a stream through that it cannot hold back.

    A LangChain callback sees each token only as it is handed to the consumer, so it
    cannot keep a rejected draft from being shown. When an answer rule of the policy can
    block (``abstain`` / ``reject_answer``), :class:`~ssd_guard.integrations.langchain.SSDGuard`
    raises this on the first streamed token instead: stream through ``guard.wrap(model)``
    or the agent middleware, which hold the stream until the answer is checked, or pass
    ``stream_unchecked=True`` to accept that drafts are shown before the check.
    """


# --------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------
def text_of(message: BaseMessage | str) -> str:
    if isinstance(message, str):
        return message
    return message.text if isinstance(message.text, str) else str(message.content)


def to_messages(input_: Any) -> list[BaseMessage]:
    if isinstance(input_, PromptValue):
        return input_.to_messages()
    if isinstance(input_, str):
        return [HumanMessage(content=input_)]
    if isinstance(input_, BaseMessage):
        return [input_]
    return list(convert_to_messages(input_))


def last_human(messages: Sequence[BaseMessage]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage) or messages[i].type == "human":
            return i
    return None


def with_prompt(messages: Sequence[BaseMessage], index: int, prompt: str) -> list[BaseMessage]:
    out = list(messages)
    out[index] = out[index].model_copy(update={"content": prompt})
    return out


def answer_text(raw: Any) -> str | None:
    """The text to check of a model output; ``None`` for tool calls / empty outputs."""
    if isinstance(raw, str):
        return raw
    if hasattr(raw, "result"):  # langchain.agents ModelResponse
        msgs = [m for m in raw.result if isinstance(m, AIMessage)]
        return answer_text(msgs[-1]) if msgs else None
    if isinstance(raw, AIMessage) and raw.tool_calls:
        return None
    if isinstance(raw, BaseMessage):
        text = text_of(raw)
        return text if text.strip() else None
    return None


def as_chunk(value: Any) -> AIMessageChunk:
    """A streamed item (a chat model's chunk, an LLM's string) as an ``AIMessageChunk``."""
    if isinstance(value, AIMessageChunk):
        return value
    if isinstance(value, BaseMessageChunk | BaseMessage):
        return AIMessageChunk(content=value.content, id=value.id)
    return AIMessageChunk(content=str(value))


def merge_chunks(chunks: Sequence[AIMessageChunk]) -> AIMessageChunk:
    if not chunks:
        return AIMessageChunk(content="")
    out = chunks[0]
    for chunk in chunks[1:]:
        out = out + chunk
    return out


def to_chunk(message: AIMessage) -> AIMessageChunk:
    """One chunk holding a whole message (the abstention, a checked answer)."""
    return AIMessageChunk(
        content=message.content,
        response_metadata=dict(message.response_metadata),
        tool_call_chunks=[
            {"name": tc["name"], "args": None, "id": tc.get("id"), "index": i}
            for i, tc in enumerate(message.tool_calls)
        ]
        if message.tool_calls
        else [],
        id=message.id,
    )


def result_message(res: GuardResult) -> AIMessage:
    """The ``AIMessage`` a guarded call returns; ``response_metadata["ssd_guard"]`` holds
    :meth:`GuardResult.to_dict`."""
    meta = res.to_dict()
    raw = res.raw
    if res.abstained or raw is None:
        return AIMessage(content=res.output, response_metadata={"ssd_guard": meta})
    if isinstance(raw, AIMessage):
        return raw.model_copy(
            update={"response_metadata": {**raw.response_metadata, "ssd_guard": meta}}
        )
    if isinstance(raw, BaseMessage):
        return AIMessage(content=raw.content, response_metadata={"ssd_guard": meta})
    return AIMessage(content=str(raw), response_metadata={"ssd_guard": meta})


def blocked_error(decision: Decision, default_message: str) -> GuardBlockedError:
    return GuardBlockedError(
        decision.message or default_message,
        action=decision.action,
        rule=decision.rule,
        scores=dict(decision.scores),
    )


def decision_from_dict(d: Mapping[str, Any]) -> Decision:
    return Decision(
        action=d["action"],
        rule=d.get("rule"),
        scope=d["scope"],
        scores=dict(d.get("scores") or {}),
        thresholds=dict(d.get("thresholds") or {}),
        params=dict(d.get("params") or {}),
        message=d.get("message"),
        missing_scores=tuple(d.get("missing_scores") or ()),
        policy_name=d.get("policy_name"),
    )


# --------------------------------------------------------------------------------------
# The run context LangChain gives
# --------------------------------------------------------------------------------------
def user_tags(*groups: Sequence[str] | None) -> tuple[str, ...]:
    """The tags worth auditing and matching rules against, in order, without repeats and
    without LangChain's / LangGraph's bookkeeping tags (``seq:step:1``, ``nostream``...)."""
    out: dict[str, None] = {}
    for group in groups:
        for tag in group or ():
            if (
                isinstance(tag, str)
                and tag not in _INTERNAL_TAGS
                and not tag.startswith(_INTERNAL_TAG_PREFIXES)
            ):
                out[tag] = None
    return tuple(out)


def _jsonable(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth >= 4:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


def clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's metadata as JSON-able data (LangGraph's private ``__`` keys left out)."""
    return {
        str(k): _jsonable(v)
        for k, v in (metadata or {}).items()
        if not (isinstance(k, str) and k.startswith("__"))
    }


@dataclass(frozen=True)
class RunInfo:
    """A guarded LangChain run: its ids, tags, metadata and name, as the audit records
    them (``run_id`` / ``parent_run_id`` / ``tags`` / ``metadata`` / ``run_name``)."""

    run_id: str
    parent_run_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    run_name: str | None = None

    @classmethod
    def of(
        cls,
        run_id: Any,
        parent_run_id: Any = None,
        *,
        tags: Sequence[str] | None = (),
        extra_tags: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        run_name: str | None = None,
    ) -> RunInfo:
        return cls(
            run_id=str(run_id),
            parent_run_id=None if parent_run_id is None else str(parent_run_id),
            tags=user_tags(extra_tags, tags),
            metadata=clean_metadata(metadata),
            run_name=run_name,
        )

    @classmethod
    def of_run(
        cls, run_manager: Any, *, extra_tags: Sequence[str] = (), run_name: str | None = None
    ) -> RunInfo:
        """From a LangChain run manager (``CallbackManagerForChainRun`` or its async twin)."""
        return cls.of(
            run_manager.run_id,
            run_manager.parent_run_id,
            tags=run_manager.tags,
            extra_tags=extra_tags,
            metadata=run_manager.metadata,
            run_name=run_name,
        )

    @property
    def kw(self) -> dict[str, Any]:
        """``tags`` / ``run_name`` for the guard's checks."""
        return {"tags": list(self.tags), "run_name": self.run_name}

    @property
    def run_kw(self) -> dict[str, Any]:
        """:attr:`kw` plus the run ids, for ``Guard.prepare`` / ``Guard.run``."""
        return {**self.kw, "run_id": self.run_id, "parent_run_id": self.parent_run_id}

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Bind the run to the audit events emitted inside (``metadata`` included)."""
        extra = {"metadata": self.metadata} if self.metadata else {}
        with bind_run(self.run_id, self.parent_run_id, **extra):
            yield

    def call(self, sync: Callable[[], T], async_: Callable[[], Awaitable[T]]) -> Call[T]:
        """A guard operation for a flow, run with this run bound (see :meth:`bound`)."""

        def run_sync() -> T:
            with self.bound():
                return sync()

        async def run_async() -> T:
            with self.bound():
                return await async_()

        return Call(run_sync, run_async)


def answer_can_block(guard: Guard, tags: Sequence[str] = (), run_name: str | None = None) -> bool:
    """Whether an answer check can stop this call's answer (so a stream must be held):
    an answer-scope ``abstain`` / ``reject_answer`` rule whose filters let the call
    through, an ``abstain`` default action, or a cache that fails closed."""
    policy = guard.policy
    if policy.default_action in BLOCKING_ACTIONS:
        return True
    if getattr(guard.cache, "fail_mode", None) == "closed":
        return True
    tags = tuple(tags)
    return any(
        rule.scope == "answer"
        and rule.action in BLOCKING_ACTIONS
        and rule.filters_match(tags, run_name, None)
        for rule in policy.rules
    )


# --------------------------------------------------------------------------------------
# Whose hidden states are read: decided by ssd_guard.provenance (one place)
# --------------------------------------------------------------------------------------
class WrapsModel:
    """Marker of the guard's Runnables around a model (``.model`` is the inner one)."""

    model: Any
    _ssd_guard_wraps_model = True  # ssd_guard.provenance.WRAPS_MODEL_ATTR


#: The ``transformers`` model behind a ``ChatHuggingFace`` / ``HuggingFacePipeline``
#: (possibly bound or wrapped by the guard), else ``None``.
local_hf_model = base_model_of


def resolve_hidden_state_source(model: Any, scorer: RiskScorer) -> tuple[str, str | None]:
    """``(hidden_state_source, guarded model id)`` for *model* guarded with *scorer*
    (:func:`ssd_guard.provenance.resolve_hidden_state_source`)."""
    return provenance.resolve_hidden_state_source(scorer, model=model, proxy=True), model_name(
        model
    )
