"""LangChain integration: a callback handler, a Runnable wrapper and an agent middleware.

Three ways to put a :class:`~ssd_guard.guard.Guard` around a LangChain model, from the
least to the most invasive:

``SSDGuard`` / ``AsyncSSDGuard`` (callback handlers)
    ``model.invoke(..., config={"callbacks": [guard]})``. Every chat-model / LLM start is
    scored (prompt = the last human message) and every end (the answer); decisions are
    audited. A callback cannot change what the model does, so a *blocking* decision
    (``abstain``, ``reject_answer``, or a cache down in ``fail_mode: closed``) raises
    :class:`~ssd_guard.errors.GuardBlockedError` (``raise_error`` is set only when the
    policy can block); ``retrieve`` and ``flag_poisoned`` are only logged here. Use
    ``SSDGuard`` with ``invoke`` and ``ainvoke``; ``AsyncSSDGuard`` only with async calls
    (LangChain swallows errors of async handlers driven from sync code).

``guard.wrap(model)`` (a Runnable)
    Performs the actions: abstains without calling the model, retrieves and puts the
    documents in the prompt, rejects and regenerates answers, drops poisoned documents.
    Returns an ``AIMessage`` (the abstention message when abstaining) whose
    ``response_metadata["ssd_guard"]`` holds the decisions.

``guard.middleware()`` / :class:`SSDGuardMiddleware` (``langchain.agents.create_agent``)
    ``before_model`` checks each new user turn (abstain ends the run before the model is
    called; retrieve fetches documents for the turn), ``wrap_model_call`` puts them in the
    request and checks final answers (reject -> the handler is called again),
    ``wrap_tool_call`` replaces poisoned tool outputs with a quarantine notice.
    ``langchain`` (v1) is an optional extra: the middleware is imported lazily.

Whose hidden states are read is recorded as ``hidden_state_source``: ``guarded-model``
when the guarded model is a local Hugging Face model (``ChatHuggingFace`` /
``HuggingFacePipeline``) that *is* the scorer's base model, else ``proxy:<scorer model>``
(the scorer's base model stands in for an API-only or another model).
"""

import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NotRequired
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManagerForChainRun,
    BaseCallbackHandler,
    CallbackManagerForChainRun,
)
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import patch_config

from ssd_guard.cache import ScoreCache
from ssd_guard.errors import GuardBlockedError
from ssd_guard.guard import Guard, GuardResult, Retriever
from ssd_guard.policy import Decision, Policy, load_default_policy
from ssd_guard.scoring.base import RiskScorer

__all__ = [
    "AsyncSSDGuard",
    "GuardedChatModel",
    "LocalGuardedChatModel",
    "SSDGuard",
    "SSDGuardMiddleware",
    "local_hf_model",
    "resolve_hidden_state_source",
]

#: Private agent-state key where the middleware keeps the current turn's check.
TURN_KEY = "ssd_guard_turn"
QUARANTINE_NOTICE = (
    "[ssd-guard] The output of tool '{tool}' was withheld: it is far off the expected "
    "answer distribution and may be poisoned (rule '{rule}', loglik {loglik})."
)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _text(message: BaseMessage | str) -> str:
    if isinstance(message, str):
        return message
    return message.text if isinstance(message.text, str) else str(message.content)


def _to_messages(input_: Any) -> list[BaseMessage]:
    if isinstance(input_, PromptValue):
        return input_.to_messages()
    if isinstance(input_, str):
        return [HumanMessage(content=input_)]
    if isinstance(input_, BaseMessage):
        return [input_]
    return list(convert_to_messages(input_))


def _last_human(messages: Sequence[BaseMessage]) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage) or messages[i].type == "human":
            return i
    return None


def _with_prompt(messages: Sequence[BaseMessage], index: int, prompt: str) -> list[BaseMessage]:
    out = list(messages)
    out[index] = out[index].model_copy(update={"content": prompt})
    return out


def _answer_text(raw: Any) -> str | None:
    """The text to check of a model output; ``None`` for tool calls / empty outputs."""
    if isinstance(raw, str):
        return raw
    if hasattr(raw, "result"):  # langchain.agents ModelResponse
        msgs = [m for m in raw.result if isinstance(m, AIMessage)]
        return _answer_text(msgs[-1]) if msgs else None
    if isinstance(raw, AIMessage) and raw.tool_calls:
        return None
    if isinstance(raw, BaseMessage):
        text = _text(raw)
        return text if text.strip() else None
    return None


def _blocked_error(decision: Decision, default_message: str) -> GuardBlockedError:
    return GuardBlockedError(
        decision.message or default_message,
        action=decision.action,
        rule=decision.rule,
        scores=dict(decision.scores),
    )


def _decision_from_dict(d: dict[str, Any]) -> Decision:
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


def local_hf_model(model: Any) -> Any | None:
    """The ``transformers`` model behind a ``ChatHuggingFace`` / ``HuggingFacePipeline``
    (possibly bound with ``bind_tools`` / ``bind`` or wrapped by the guard), else ``None``
    (API-only models)."""
    obj = model
    for _ in range(8):
        if isinstance(obj, GuardedChatModel):
            obj = obj.model
            continue
        bound = getattr(obj, "bound", None)  # RunnableBinding
        if bound is not None and bound is not obj:
            obj = bound
            continue
        break
    llm = getattr(obj, "llm", None)
    pipe = getattr(llm if llm is not None else obj, "pipeline", None)
    hf = getattr(pipe, "model", None)
    return hf if hf is not None and hasattr(hf, "config") else None


def _model_name(model: Any) -> str | None:
    for attr in ("model_id", "model_name", "model"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    bound = getattr(model, "bound", None)
    if bound is not None and bound is not model:
        return _model_name(bound)
    return type(model).__name__ if model is not None else None


def _scorer_base_model(scorer: Any) -> tuple[Any | None, str | None]:
    """(the scorer's in-memory base model, its recorded fingerprint), when it has them."""
    lm = getattr(getattr(scorer, "encoder", None), "model", None)
    manifest = getattr(scorer, "manifest", None)
    fp = getattr(getattr(manifest, "base_model", None), "fingerprint", None)
    return lm, fp if isinstance(fp, str) else getattr(scorer, "base_fingerprint", None)


def resolve_hidden_state_source(model: Any, scorer: RiskScorer) -> tuple[str, str | None]:
    """``(hidden_state_source, guarded model id)`` for *model* guarded with *scorer*.

    ``guarded-model`` when *model* is a local HF model that is the scorer's base model
    (the same object, or the same weights by :func:`ssd_guard.models.model_fingerprint`);
    otherwise ``proxy:<scorer.model_id>``.
    """
    name = _model_name(model)
    hf = local_hf_model(model)
    if hf is not None:
        base, fingerprint = _scorer_base_model(scorer)
        if base is not None and base is hf:
            return "guarded-model", name
        if fingerprint:
            try:
                from ssd_guard.models import model_fingerprint

                if model_fingerprint(hf) == fingerprint:
                    return "guarded-model", name
            except Exception:  # an exotic model without input embeddings: not the same
                pass
    return f"proxy:{scorer.model_id}", name


# --------------------------------------------------------------------------------------
# Callback handlers
# --------------------------------------------------------------------------------------
class _GuardHandlerMixin:
    """What the sync and async handlers share: construction, bookkeeping, wrap/middleware."""

    guard: Guard
    raise_error: bool

    def _setup(
        self,
        scorer: RiskScorer | None,
        policy: Policy | str | Path | None,
        *,
        guard: Guard | None,
        cache: ScoreCache | None,
        retriever: Retriever | None,
        aretriever: Callable[[str], Awaitable[Sequence[str]]] | None,
        hidden_state_source: str | None,
        raise_error: bool | None,
        tags: Sequence[str],
        run_name: str | None,
    ) -> None:
        if guard is None:
            if scorer is None:
                raise TypeError("pass a scorer (and a policy), or guard=Guard(...)")
            guard = Guard(
                scorer,
                policy if policy is not None else load_default_policy(),
                cache=cache,
                retriever=retriever,
                aretriever=aretriever,
            )
        self._explicit_source = hidden_state_source
        if hidden_state_source is None and guard.hidden_state_source == "scorer":
            hidden_state_source = f"proxy:{guard.scorer.model_id}"
        self.guard = (
            guard.with_hidden_state_source(hidden_state_source) if hidden_state_source else guard
        )
        self.raise_error = self.guard.has_blocking_rules if raise_error is None else raise_error
        self.tags = tuple(tags)
        self.run_name = run_name
        self._pending: dict[UUID, tuple[str, float | None, Guard]] = {}
        self._lock = threading.Lock()

    # -- the other integrations ----------------------------------------------------------
    def wrap(self, model: Runnable[Any, Any]) -> "GuardedChatModel":
        """A Runnable around *model* that performs the policy's actions (see module doc)."""
        return GuardedChatModel(
            model, self.guard, hidden_state_source=self._explicit_source, tags=self.tags
        )

    def middleware(self, *, model: Any = None) -> Any:
        """An :class:`SSDGuardMiddleware` for ``langchain.agents.create_agent``."""
        return _build_middleware_class()(
            self.guard,
            model=model,
            hidden_state_source=self._explicit_source,
            tags=self.tags,
            run_name=self.run_name,
        )

    # -- bookkeeping ---------------------------------------------------------------------
    def _guard_for(self, serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> Guard:
        name = kwargs.get("name") or (serialized or {}).get("name")
        ident = (serialized or {}).get("id")
        if not name and isinstance(ident, list) and ident:
            name = str(ident[-1])
        if not name:
            return self.guard
        return self.guard.with_hidden_state_source(
            self.guard.hidden_state_source, guarded_model=str(name)
        )

    def _tags(self, tags: Sequence[str] | None) -> tuple[str, ...]:
        return (*self.tags, *(tags or ()))

    def _remember(self, run_id: UUID, prompt: str, decision: Decision, guard: Guard) -> None:
        with self._lock:
            self._pending[run_id] = (prompt, decision.scores.get("entropy"), guard)

    def _forget(self, run_id: UUID) -> tuple[str, float | None, Guard] | None:
        with self._lock:
            return self._pending.pop(run_id, None)

    def _raise_if_blocking(self, decision: Decision) -> None:
        if decision.blocking:
            raise _blocked_error(decision, self.guard.abstain_message)

    @staticmethod
    def _prompt_from_messages(messages: list[list[BaseMessage]]) -> str | None:
        if not messages or not messages[0]:
            return None
        i = _last_human(messages[0])
        return _text(messages[0][i if i is not None else -1])

    @staticmethod
    def _answer_from(response: LLMResult) -> str | None:
        if not response.generations or not response.generations[0]:
            return None
        gen = response.generations[0][0]
        if isinstance(gen, ChatGeneration):
            return _answer_text(gen.message)
        return gen.text if gen.text.strip() else None


class SSDGuard(_GuardHandlerMixin, BaseCallbackHandler):
    """LangChain callback handler scoring every model call with SSD signals.

    ``SSDGuard(scorer, policy)`` (policy: a :class:`Policy`, a YAML path, or ``None`` for
    the default policy) or ``SSDGuard(guard=Guard(...))``. Attach it with
    ``config={"callbacks": [guard]}``; see the module doc for what it does. ``wrap`` and
    ``middleware`` give the acting integrations with the same guard.
    """

    def __init__(
        self,
        scorer: RiskScorer | None = None,
        policy: Policy | str | Path | None = None,
        *,
        guard: Guard | None = None,
        cache: ScoreCache | None = None,
        retriever: Retriever | None = None,
        aretriever: Callable[[str], Awaitable[Sequence[str]]] | None = None,
        hidden_state_source: str | None = None,
        raise_error: bool | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
    ) -> None:
        self._setup(
            scorer,
            policy,
            guard=guard,
            cache=cache,
            retriever=retriever,
            aretriever=aretriever,
            hidden_state_source=hidden_state_source,
            raise_error=raise_error,
            tags=tags,
            run_name=run_name,
        )

    def _on_start(
        self,
        serialized: dict[str, Any],
        prompt: str | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        kwargs: dict[str, Any],
    ) -> None:
        if not prompt:
            return
        guard = self._guard_for(serialized, kwargs)
        with guard.bind(str(run_id), str(parent_run_id) if parent_run_id else None):
            decision = guard.check_prompt(
                prompt, tags=self._tags(tags), run_name=kwargs.get("name") or self.run_name
            )
        self._raise_if_blocking(decision)  # a blocked call never starts: nothing to remember
        self._remember(run_id, prompt, decision, guard)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._on_start(
            serialized, self._prompt_from_messages(messages), run_id, parent_run_id, tags, kwargs
        )

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        self._on_start(
            serialized, prompts[0] if prompts else None, run_id, parent_run_id, tags, kwargs
        )

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        pending = self._forget(run_id)
        answer = self._answer_from(response)
        if pending is None or answer is None:
            return
        prompt, entropy, guard = pending
        with guard.bind(str(run_id), str(parent_run_id) if parent_run_id else None):
            decision = guard.check_answer(
                prompt, answer, entropy=entropy, tags=self._tags(tags), run_name=self.run_name
            )
        self._raise_if_blocking(decision)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Any:
        self._forget(run_id)


class AsyncSSDGuard(_GuardHandlerMixin, AsyncCallbackHandler):
    """Async twin of :class:`SSDGuard` (scoring runs in a worker thread). Use it with
    ``ainvoke`` / ``astream``; LangChain swallows async-handler errors in sync calls."""

    def __init__(
        self,
        scorer: RiskScorer | None = None,
        policy: Policy | str | Path | None = None,
        *,
        guard: Guard | None = None,
        cache: ScoreCache | None = None,
        retriever: Retriever | None = None,
        aretriever: Callable[[str], Awaitable[Sequence[str]]] | None = None,
        hidden_state_source: str | None = None,
        raise_error: bool | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
    ) -> None:
        self._setup(
            scorer,
            policy,
            guard=guard,
            cache=cache,
            retriever=retriever,
            aretriever=aretriever,
            hidden_state_source=hidden_state_source,
            raise_error=raise_error,
            tags=tags,
            run_name=run_name,
        )

    async def _aon_start(
        self,
        serialized: dict[str, Any],
        prompt: str | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        kwargs: dict[str, Any],
    ) -> None:
        if not prompt:
            return
        guard = self._guard_for(serialized, kwargs)
        with guard.bind(str(run_id), str(parent_run_id) if parent_run_id else None):
            decision = await guard.acheck_prompt(
                prompt, tags=self._tags(tags), run_name=kwargs.get("name") or self.run_name
            )
        self._raise_if_blocking(decision)  # a blocked call never starts: nothing to remember
        self._remember(run_id, prompt, decision, guard)

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        await self._aon_start(
            serialized, self._prompt_from_messages(messages), run_id, parent_run_id, tags, kwargs
        )

    async def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._aon_start(
            serialized, prompts[0] if prompts else None, run_id, parent_run_id, tags, kwargs
        )

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        pending = self._forget(run_id)
        answer = self._answer_from(response)
        if pending is None or answer is None:
            return
        prompt, entropy, guard = pending
        with guard.bind(str(run_id), str(parent_run_id) if parent_run_id else None):
            decision = await guard.acheck_answer(
                prompt, answer, entropy=entropy, tags=self._tags(tags), run_name=self.run_name
            )
        self._raise_if_blocking(decision)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._forget(run_id)


# --------------------------------------------------------------------------------------
# Runnable wrapper
# --------------------------------------------------------------------------------------
def _metadata(res: GuardResult) -> dict[str, Any]:
    return res.to_dict()


def _result_message(res: GuardResult) -> AIMessage:
    meta = _metadata(res)
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


class GuardedChatModel(Runnable[Any, AIMessage]):
    """A chat model (or LLM) behind a :class:`Guard`: made by :meth:`SSDGuard.wrap`.

    Input: whatever the model takes (a string, messages, a prompt value); the prompt
    checked is the last human message, and retrieved context replaces that message's
    text (see :data:`ssd_guard.guard.DEFAULT_CONTEXT_TEMPLATE`). Output: an ``AIMessage``;
    ``response_metadata["ssd_guard"]`` is :meth:`GuardResult.to_dict`. ``stream`` /
    ``astream`` yield the checked answer as one chunk (an answer can only be released
    once it has been checked).
    """

    def __init__(
        self,
        model: Runnable[Any, Any],
        guard: Guard,
        *,
        hidden_state_source: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        self.model = model
        if hidden_state_source:
            self.guard = guard.with_hidden_state_source(
                hidden_state_source, guarded_model=_model_name(model)
            )
        else:
            source, name = resolve_hidden_state_source(model, guard.scorer)
            self.guard = guard.with_hidden_state_source(source, guarded_model=name)
        self.tags = tuple(tags)

    @property
    def hidden_state_source(self) -> str:
        return self.guard.hidden_state_source

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"SSDGuard[{_model_name(self.model)}]" + (suffix or "")

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> "GuardedChatModel":
        """Bind tools on the inner model; the guard stays around it."""
        inner = self.model.bind_tools(tools, **kwargs)  # type: ignore[attr-defined]
        return GuardedChatModel(
            inner, self.guard, hidden_state_source=self.guard.hidden_state_source, tags=self.tags
        )

    # -- plumbing ------------------------------------------------------------------------
    def _prepare_call(self, input_: Any) -> tuple[list[BaseMessage], int | None, str]:
        messages = _to_messages(input_)
        index = _last_human(messages)
        prompt = _text(messages[index if index is not None else -1]) if messages else ""
        return messages, index, prompt

    def _run_kwargs(
        self, config: RunnableConfig, run_manager: Any, run_name: str | None
    ) -> dict[str, Any]:
        parent = getattr(run_manager, "parent_run_id", None)
        return {
            "tags": (*self.tags, *(config.get("tags") or ())),
            "run_name": run_name,
            "run_id": str(run_manager.run_id),
            "parent_run_id": str(parent) if parent else None,
        }

    def _messages_for(
        self, messages: list[BaseMessage], index: int | None, prompt: str, new_prompt: str
    ) -> list[BaseMessage]:
        if new_prompt == prompt:
            return messages
        if index is None:
            return [*messages, HumanMessage(content=new_prompt)]
        return _with_prompt(messages, index, new_prompt)

    def _invoke(
        self,
        input_: Any,
        run_manager: CallbackManagerForChainRun,
        config: RunnableConfig,
        _ssd_run_name: str | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        messages, index, prompt = self._prepare_call(input_)
        child = patch_config(config, callbacks=run_manager.get_child())

        def generate(p: str) -> Any:
            return self.model.invoke(
                self._messages_for(messages, index, prompt, p), child, **kwargs
            )

        res = self.guard.run(
            prompt,
            generate,
            extract=_answer_text,
            **self._run_kwargs(config, run_manager, _ssd_run_name),
        )
        return _result_message(res)

    async def _ainvoke(
        self,
        input_: Any,
        run_manager: AsyncCallbackManagerForChainRun,
        config: RunnableConfig,
        _ssd_run_name: str | None = None,
        **kwargs: Any,
    ) -> AIMessage:
        messages, index, prompt = self._prepare_call(input_)
        child = patch_config(config, callbacks=run_manager.get_child())

        async def generate(p: str) -> Any:
            msgs = self._messages_for(messages, index, prompt, p)
            return await self.model.ainvoke(msgs, child, **kwargs)

        res = await self.guard.arun(
            prompt,
            generate,
            extract=_answer_text,
            **self._run_kwargs(config, run_manager, _ssd_run_name),
        )
        return _result_message(res)

    # -- Runnable API ----------------------------------------------------------------------
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(
            self._invoke,
            input,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return await self._acall_with_config(
            self._ainvoke,
            input,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )

    @staticmethod
    def _chunk(message: AIMessage) -> AIMessageChunk:
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

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        yield self._chunk(self.invoke(input, config, **kwargs))

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        yield self._chunk(await self.ainvoke(input, config, **kwargs))

    def __repr__(self) -> str:
        return f"GuardedChatModel({self.model!r}, {self.guard!r})"


# --------------------------------------------------------------------------------------
# Agent middleware (langchain >= 1.0, imported lazily)
# --------------------------------------------------------------------------------------
_MIDDLEWARE_CLASS: type | None = None


class LocalGuardedChatModel(Runnable[Any, AIMessage]):
    """A LangChain Runnable over :class:`ssd_guard.local.GuardedLocalModel`: the zero-extra-
    pass guard for LangChain chains and loops.

    Input is anything a chat model takes (a string, messages, a prompt value); the last
    human message is the question (earlier messages are not shown to the model: the
    student reads prompts in its own distillation format). The output is an
    ``AIMessage`` with the guard's result under ``response_metadata["ssd_guard"]`` (the
    abstention message when the guard abstains). ``invoke`` / ``ainvoke`` / ``batch`` /
    ``stream`` (one chunk) work as for any Runnable::

        chat = LocalGuardedChatModel(GuardedLocalModel(guard))
        (ChatPromptTemplate.from_template("{q}") | chat).invoke({"q": "Who wrote Hamlet?"})
    """

    def __init__(self, local: Any, *, tags: Sequence[str] = ()) -> None:
        self.local = local
        self.tags = tuple(tags)

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"LocalGuardedChatModel[{self.local.model_id}]" + (suffix or "")

    def _question(self, input_: Any) -> str:
        messages = _to_messages(input_)
        index = _last_human(messages)
        if index is None:
            raise ValueError("LocalGuardedChatModel needs a human message to answer")
        return _text(messages[index])

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        question = self._question(input)
        cfg = config or {}
        res = self.local.invoke(
            question, tags=[*self.tags, *(cfg.get("tags") or [])], run_name=cfg.get("run_name")
        )
        return _result_message(res)

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        question = self._question(input)
        cfg = config or {}
        res = await self.local.ainvoke(
            question, tags=[*self.tags, *(cfg.get("tags") or [])], run_name=cfg.get("run_name")
        )
        return _result_message(res)

    def __repr__(self) -> str:
        return f"LocalGuardedChatModel({self.local!r})"


def _build_middleware_class() -> type:
    global _MIDDLEWARE_CLASS
    if _MIDDLEWARE_CLASS is not None:
        return _MIDDLEWARE_CLASS
    try:
        from langchain.agents.middleware import (
            AgentMiddleware,
            AgentState,
            ModelRequest,
            ModelResponse,
            ToolCallRequest,
            hook_config,
        )
        from langchain.agents.middleware.types import PrivateStateAttr
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "SSDGuardMiddleware needs LangChain v1 agents (langchain.agents.middleware), "
            "which is not installed; install the extra: pip install 'ssd-guard[langchain]' "
            f"(or pip install 'langchain>=1.0'). Original error: {exc}"
        ) from exc

    class SSDGuardState(AgentState):  # type: ignore[type-arg]
        """Agent state with the guard's per-turn record (private: not in input/output)."""

        ssd_guard_turn: NotRequired[Annotated[dict[str, Any] | None, PrivateStateAttr]]

    class _SSDGuardMiddleware(AgentMiddleware):  # type: ignore[type-arg]
        """SSD guard for ``create_agent(..., middleware=[SSDGuardMiddleware(guard)])``.

        * ``before_model``: on a new user turn, checks the prompt; ``abstain`` adds the
          abstention message and ends the run without calling the model; ``retrieve``
          fetches documents (poisoned ones flagged) for the whole turn.
        * ``wrap_model_call``: puts the turn's documents in the request, checks every final
          text answer (not tool calls) and calls the handler again on ``reject_answer``
          (at most ``max_regenerations`` times, then abstains).
        * ``wrap_tool_call``: checks tool outputs at document scope (``source: tool``); a
          flagged output is replaced by a quarantine notice (``mode: quarantine`` keeps the
          original in ``artifact["ssd_guard_quarantined"]``).
        """

        state_schema = SSDGuardState

        def __init__(
            self,
            guard: Guard | _GuardHandlerMixin,
            *,
            model: Any = None,
            hidden_state_source: str | None = None,
            tags: Sequence[str] = (),
            run_name: str | None = None,
        ) -> None:
            super().__init__()
            core = guard.guard if isinstance(guard, _GuardHandlerMixin) else guard
            self._explicit = hidden_state_source
            self.guard = core
            if hidden_state_source:
                self.guard = core.with_hidden_state_source(hidden_state_source)
            elif model is not None:
                source, name = resolve_hidden_state_source(model, core.scorer)
                self.guard = core.with_hidden_state_source(source, guarded_model=name)
            elif core.hidden_state_source == "scorer":
                self.guard = core.with_hidden_state_source(f"proxy:{core.scorer.model_id}")
            self._by_model: dict[int, Guard] = {}
            self._last: Guard | None = None
            self.tags = tuple(tags)
            self.run_name = run_name

        @property
        def name(self) -> str:
            return "SSDGuardMiddleware"

        # -- helpers -------------------------------------------------------------------
        def _guard_for_model(self, model: Any) -> Guard:
            if self._explicit or model is None:
                return self.guard
            key = id(model)
            if key not in self._by_model:
                source, name = resolve_hidden_state_source(model, self.guard.scorer)
                self._by_model[key] = self.guard.with_hidden_state_source(
                    source, guarded_model=name
                )
            # before_model does not see the model: it uses the last one seen here
            self._last = self._by_model[key]
            return self._last

        @staticmethod
        def _new_turn(messages: Sequence[BaseMessage]) -> tuple[int, str] | None:
            if not messages:
                return None
            last = messages[-1]
            if isinstance(last, HumanMessage) or last.type == "human":
                return len(messages) - 1, _text(last)
            return None

        @staticmethod
        def _parent(runtime: Any) -> str | None:
            info = getattr(runtime, "execution_info", None)
            thread = getattr(info, "thread_id", None) if info is not None else None
            return str(thread) if thread else None

        def _turn(self, res: GuardResult, message: BaseMessage) -> dict[str, Any]:
            return {
                "message_id": message.id,
                "prompt": res.prompt,
                "final_prompt": res.final_prompt,
                "entropy": res.entropy,
                "run_id": res.run_id,
                "parent_run_id": res.parent_run_id,
                "abstained": res.abstained,
                "output": res.output,
                "documents": len(res.documents),
                "quarantined": list(res.quarantined),
                "dropped": res.dropped,
                "decisions": [d.to_dict() for d in res.decisions],
            }

        def _before_update(self, res: GuardResult, message: BaseMessage) -> dict[str, Any]:
            update: dict[str, Any] = {TURN_KEY: self._turn(res, message)}
            if res.abstained:
                update["messages"] = [_result_message(res)]
                update["jump_to"] = "end"
            return update

        def _current_turn(
            self, state: Any, messages: Sequence[BaseMessage]
        ) -> dict[str, Any] | None:
            turn = (state or {}).get(TURN_KEY) if isinstance(state, dict) else None
            i = _last_human(messages)
            if turn is None or i is None:
                return turn
            human = messages[i]
            same = (
                turn.get("message_id") == human.id
                if human.id is not None
                else turn.get("prompt") == _text(human)
            )
            return turn if same else None

        @staticmethod
        def _result_from_turn(turn: dict[str, Any]) -> GuardResult:
            return GuardResult(
                output=turn.get("output") or "",
                abstained=bool(turn.get("abstained")),
                prompt=turn["prompt"],
                final_prompt=turn["final_prompt"],
                run_id=turn["run_id"],
                parent_run_id=turn.get("parent_run_id"),
                entropy=turn.get("entropy"),
                decisions=[_decision_from_dict(d) for d in turn.get("decisions", [])],
            )

        def _request_with_context(self, request: Any, turn: dict[str, Any]) -> Any:
            if turn["final_prompt"] == turn["prompt"]:
                return request
            i = _last_human(request.messages)
            if i is None:
                return request
            return request.override(
                messages=_with_prompt(request.messages, i, turn["final_prompt"])
            )

        @staticmethod
        def _annotate(response: Any, res: GuardResult) -> Any:
            msgs = list(getattr(response, "result", []) or [])
            for j in range(len(msgs) - 1, -1, -1):
                if isinstance(msgs[j], AIMessage):
                    m = msgs[j]
                    msgs[j] = m.model_copy(
                        update={
                            "response_metadata": {
                                **m.response_metadata,
                                "ssd_guard": res.to_dict(),
                            }
                        }
                    )
                    return ModelResponse(
                        result=msgs, structured_response=response.structured_response
                    )
            return response

        def _kw(self) -> dict[str, Any]:
            return {"tags": self.tags, "run_name": self.run_name}

        # -- before_model --------------------------------------------------------------
        @hook_config(can_jump_to=["end"])
        def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            messages = state.get("messages", [])
            new = self._new_turn(messages)
            if new is None or self._current_turn(state, messages) is not None:
                return None
            res = (self._last or self.guard).prepare(
                new[1], run_id=uuid.uuid4().hex, parent_run_id=self._parent(runtime), **self._kw()
            )
            return self._before_update(res, messages[new[0]])

        @hook_config(can_jump_to=["end"])
        async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            messages = state.get("messages", [])
            new = self._new_turn(messages)
            if new is None or self._current_turn(state, messages) is not None:
                return None
            res = await (self._last or self.guard).aprepare(
                new[1], run_id=uuid.uuid4().hex, parent_run_id=self._parent(runtime), **self._kw()
            )
            return self._before_update(res, messages[new[0]])

        # -- wrap_model_call -----------------------------------------------------------
        def wrap_model_call(
            self,
            request: ModelRequest,  # type: ignore[type-arg]
            handler: Callable[[ModelRequest], ModelResponse],  # type: ignore[type-arg]
        ) -> ModelResponse | AIMessage:  # type: ignore[type-arg]
            guard = self._guard_for_model(request.model)
            turn = self._current_turn(request.state, request.messages)
            if turn is None:
                new = self._new_turn(request.messages)
                if new is None:  # no user turn seen by the guard: pass through
                    return handler(request)
                res = guard.prepare(new[1], run_id=uuid.uuid4().hex, **self._kw())
                turn = self._turn(res, request.messages[new[0]])
            res = self._result_from_turn(turn)
            if res.abstained:
                return _result_message(res)
            req = self._request_with_context(request, turn)
            res = guard.complete(res, lambda _p: handler(req), extract=_answer_text, **self._kw())
            if res.abstained:
                return _result_message(res)
            return self._annotate(res.raw, res)

        async def awrap_model_call(
            self,
            request: ModelRequest,  # type: ignore[type-arg]
            handler: Callable[[ModelRequest], Awaitable[ModelResponse]],  # type: ignore[type-arg]
        ) -> ModelResponse | AIMessage:  # type: ignore[type-arg]
            guard = self._guard_for_model(request.model)
            turn = self._current_turn(request.state, request.messages)
            if turn is None:
                new = self._new_turn(request.messages)
                if new is None:
                    return await handler(request)
                res = await guard.aprepare(new[1], run_id=uuid.uuid4().hex, **self._kw())
                turn = self._turn(res, request.messages[new[0]])
            res = self._result_from_turn(turn)
            if res.abstained:
                return _result_message(res)
            req = self._request_with_context(request, turn)
            res = await guard.acomplete(
                res, lambda _p: handler(req), extract=_answer_text, **self._kw()
            )
            if res.abstained:
                return _result_message(res)
            return self._annotate(res.raw, res)

        # -- wrap_tool_call ------------------------------------------------------------
        def _tool_question(self, request: Any) -> tuple[str | None, dict[str, Any] | None]:
            state = request.state if isinstance(request.state, dict) else {}
            messages = state.get("messages", [])
            turn = self._current_turn(state, messages)
            if turn is not None:
                return turn["prompt"], turn
            i = _last_human(messages)
            return (_text(messages[i]) if i is not None else None), None

        def _screen_result(self, result: Any, ctx: Any, tool_name: str) -> Any:
            if not ctx.quarantined and not ctx.dropped:
                return result
            d = ctx.decisions[0]
            loglik = d.scores.get("loglik")
            notice = QUARANTINE_NOTICE.format(
                tool=tool_name,
                rule=d.rule,
                loglik="n/a" if loglik is None else f"{loglik:.3g}",
            )
            update: dict[str, Any] = {
                "content": notice,
                "response_metadata": {**result.response_metadata, "ssd_guard": d.to_dict()},
            }
            if ctx.quarantined:
                update["artifact"] = {"ssd_guard_quarantined": result.content}
            return result.model_copy(update=update)

        def wrap_tool_call(
            self,
            request: ToolCallRequest,
            handler: Callable[[ToolCallRequest], Any],
        ) -> Any:
            result = handler(request)
            if not isinstance(result, ToolMessage):
                return result
            question, turn = self._tool_question(request)
            text = _text(result)
            if not question or not text.strip():
                return result
            run = (turn or {}).get("run_id")
            with self.guard.bind(run, (turn or {}).get("parent_run_id") if run else None):
                ctx = self.guard.screen_documents(question, [text], source="tool", **self._kw())
            return self._screen_result(result, ctx, request.tool_call.get("name", "?"))

        async def awrap_tool_call(
            self,
            request: ToolCallRequest,
            handler: Callable[[ToolCallRequest], Awaitable[Any]],
        ) -> Any:
            result = await handler(request)
            if not isinstance(result, ToolMessage):
                return result
            question, turn = self._tool_question(request)
            text = _text(result)
            if not question or not text.strip():
                return result
            run = (turn or {}).get("run_id")
            with self.guard.bind(run, (turn or {}).get("parent_run_id") if run else None):
                ctx = await self.guard.ascreen_documents(
                    question, [text], source="tool", **self._kw()
                )
            return self._screen_result(result, ctx, request.tool_call.get("name", "?"))

    _SSDGuardMiddleware.__name__ = _SSDGuardMiddleware.__qualname__ = "SSDGuardMiddleware"
    _SSDGuardMiddleware.__module__ = __name__
    SSDGuardState.__module__ = __name__
    globals()["SSDGuardState"] = SSDGuardState
    _MIDDLEWARE_CLASS = _SSDGuardMiddleware
    return _SSDGuardMiddleware


if TYPE_CHECKING:
    SSDGuardMiddleware: Any
    SSDGuardState: Any


def __getattr__(name: str) -> Any:
    if name == "SSDGuardMiddleware":
        return _build_middleware_class()
    if name == "SSDGuardState":
        _build_middleware_class()
        return globals()["SSDGuardState"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
