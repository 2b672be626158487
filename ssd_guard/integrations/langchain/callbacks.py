"""The callback handler: ``model.invoke(..., config={"callbacks": [guard]})``.

Every chat-model / LLM start is scored (prompt = the last human message) and every end
(the answer); decisions are audited with LangChain's ``run_id`` / ``parent_run_id`` and
the run's tags and metadata. A callback cannot change what the model does, so a
*blocking* decision (``abstain``, ``reject_answer``, or a cache down in ``fail_mode:
closed``) raises :class:`~ssd_guard.errors.GuardBlockedError` (``raise_error`` is set only
when the policy can block); ``retrieve`` and ``flag_poisoned`` are only logged here.

Streaming: a callback sees each token only as it is handed to the consumer, so it cannot
hold a draft back until the answer is checked. When an answer rule of the policy can
block, the first streamed token raises :class:`GuardStreamingError` (nothing is shown)
unless ``stream_unchecked=True``; ``guard.wrap(model)`` and the middleware hold the stream
instead. Runs tagged ``nostream`` (LangGraph's tag: their tokens are not streamed to
``stream_mode="messages"``; the guard's own held calls carry it) are not affected.

The checks run synchronously in the handler: LangChain calls a sync handler directly in
sync runs and on a worker thread in async runs, and in both it propagates the handler's
error. (An async handler's error is only logged in a sync run, which is how a block was
lost; :class:`AsyncSSDGuard` is therefore the same handler.)
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import Runnable

from ssd_guard.cache import ScoreCache
from ssd_guard.guard import CallStats, Guard, Retriever
from ssd_guard.integrations.langchain._common import (
    NOSTREAM_TAG,
    GuardStreamingError,
    RunInfo,
    answer_can_block,
    answer_text,
    blocked_error,
    last_human,
    text_of,
)
from ssd_guard.integrations.langchain.runnable import GuardedChatModel
from ssd_guard.policy import BLOCKING_ACTIONS, Decision, Policy, load_default_policy
from ssd_guard.scoring.base import RiskScorer

if TYPE_CHECKING:
    from ssd_guard.integrations.langchain.middleware import SSDGuardMiddleware

__all__ = ["AsyncSSDGuard", "SSDGuard"]


@dataclass(frozen=True)
class _Pending:
    """A started model run whose answer is still to be checked."""

    prompt: str
    entropy: float | None
    guard: Guard
    info: RunInfo
    hold: bool
    stats: CallStats
    """The call's statistics: the answer check reuses the prompt check's hidden state."""


class SSDGuard(BaseCallbackHandler):
    """LangChain callback handler scoring every model call with SSD signals.

    ``SSDGuard(scorer, policy)`` (policy: a :class:`Policy`, a YAML path, or ``None`` for
    the default policy; scorer ``None``: the student the policy names, on its
    ``proxy_model`` if it names one) or ``SSDGuard(guard=Guard(...))``. Attach it with
    ``config={"callbacks": [guard]}``; see the module doc for what it does, including
    streaming (``stream_unchecked``). ``wrap`` and ``middleware`` give the acting
    integrations with the same guard. Works in sync and async runs.
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
        stream_unchecked: bool = False,
    ) -> None:
        if guard is None:
            guard = Guard(
                scorer,
                policy if policy is not None else load_default_policy(),
                cache=cache,
                retriever=retriever,
                aretriever=aretriever,
            )
        # A callback sees no model object: without an explicit source, proxy:<scorer>.
        self.guard = guard.for_model(source=hidden_state_source)
        self.raise_error = self.guard.has_blocking_rules if raise_error is None else raise_error
        self.tags = tuple(tags)
        self.run_name = run_name
        self.stream_unchecked = stream_unchecked
        self._pending: dict[UUID, _Pending] = {}
        self._lock = threading.Lock()

    # -- the other integrations ----------------------------------------------------------
    def wrap(self, model: Runnable[Any, Any]) -> GuardedChatModel:
        """A Runnable around *model* that performs the policy's actions."""
        return GuardedChatModel(model, self.guard, tags=self.tags)

    def middleware(self, *, model: Any = None) -> SSDGuardMiddleware:
        """An :class:`SSDGuardMiddleware` for ``langchain.agents.create_agent``."""
        # Imported here: the middleware needs ``langchain`` (v1 agents), the callback only
        # ``langchain_core``.
        from ssd_guard.integrations.langchain.middleware import SSDGuardMiddleware

        return SSDGuardMiddleware(self, model=model)

    # -- bookkeeping ---------------------------------------------------------------------
    def _guard_for(self, serialized: dict[str, Any] | None, kwargs: dict[str, Any]) -> Guard:
        name = kwargs.get("name") or (serialized or {}).get("name")
        ident = (serialized or {}).get("id")
        if not name and isinstance(ident, list) and ident:
            name = str(ident[-1])
        if not name:
            return self.guard
        return self.guard.for_model(name=str(name))

    def _forget(self, run_id: UUID) -> _Pending | None:
        with self._lock:
            return self._pending.pop(run_id, None)

    def _raise_if_blocking(self, decision: Decision) -> None:
        if decision.blocking:
            raise blocked_error(decision, self.guard.abstain_message)

    @staticmethod
    def _prompt_from_messages(messages: list[list[BaseMessage]]) -> str | None:
        if not messages or not messages[0]:
            return None
        i = last_human(messages[0])
        return text_of(messages[0][i if i is not None else -1])

    @staticmethod
    def _answer_from(response: LLMResult) -> str | None:
        if not response.generations or not response.generations[0]:
            return None
        gen = response.generations[0][0]
        if isinstance(gen, ChatGeneration):
            return answer_text(gen.message)
        return gen.text if gen.text.strip() else None

    # -- the flow: start -> (tokens) -> end ----------------------------------------------
    def _on_start(
        self,
        serialized: dict[str, Any] | None,
        prompt: str | None,
        run_id: UUID,
        kwargs: dict[str, Any],
    ) -> None:
        """Both start hooks: *kwargs* holds the rest of what LangChain passed
        (``parent_run_id``, ``tags``, ``metadata``, ``name``, the invocation params)."""
        parent_run_id: UUID | None = kwargs.get("parent_run_id")
        tags: list[str] | None = kwargs.get("tags")
        metadata: dict[str, Any] | None = kwargs.get("metadata")
        if not prompt:
            return
        guard = self._guard_for(serialized, kwargs)
        info = RunInfo.of(
            run_id,
            parent_run_id,
            tags=tags,
            extra_tags=self.tags,
            metadata=metadata,
            run_name=kwargs.get("name") or self.run_name,
        )
        stats = CallStats()
        with info.bound():
            decision = guard.check_prompt(prompt, stats=stats, **info.kw)
        self._raise_if_blocking(decision)  # a blocked call never starts: nothing to remember
        hold = (
            self.raise_error
            and not self.stream_unchecked
            and NOSTREAM_TAG not in (tags or ())
            and answer_can_block(guard, info.tags, info.run_name)
        )
        pending = _Pending(prompt, decision.scores.get("entropy"), guard, info, hold, stats)
        with self._lock:
            self._pending[run_id] = pending

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> Any:
        self._on_start(serialized, self._prompt_from_messages(messages), run_id, kwargs)

    def on_llm_start(
        self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any
    ) -> Any:
        self._on_start(serialized, prompts[0] if prompts else None, run_id, kwargs)

    def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        chunk: GenerationChunk | ChatGenerationChunk | None = None,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        with self._lock:
            pending = self._pending.get(run_id)
        if pending is None or not pending.hold:
            return
        self._forget(run_id)
        policy = pending.guard.policy
        rules = [
            r.name for r in policy.rules if r.scope == "answer" and r.action in BLOCKING_ACTIONS
        ]
        raise GuardStreamingError(
            f"SSDGuard cannot hold back a streamed answer: policy '{policy.name}' can block "
            f"answers ({', '.join(rules) or 'default_action / fail-closed cache'}) and a "
            "callback only sees each token as it is shown. Stream through guard.wrap(model) "
            "or the agent middleware (they hold the stream until the answer is checked), "
            "or pass SSDGuard(..., stream_unchecked=True) to show drafts before the check."
        )

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> Any:
        pending = self._forget(run_id)
        answer = self._answer_from(response)
        if pending is None or answer is None:
            return
        with pending.info.bound():
            decision = pending.guard.check_answer(
                pending.prompt,
                answer,
                entropy=pending.entropy,
                stats=pending.stats,
                **pending.info.kw,
            )
        self._raise_if_blocking(decision)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Any:
        self._forget(run_id)


class AsyncSSDGuard(SSDGuard):
    """:class:`SSDGuard` under the name async code looks for.

    It used to be an async handler, and LangChain only logs an async handler's error
    when the model is called synchronously ("Error in callback coroutine:
    GuardBlockedError") and returns the answer: a block was lost. The checks now run
    synchronously, like :class:`SSDGuard`'s: in an async run LangChain runs them on a
    worker thread (the event loop is not blocked) and raises their error; in a sync run
    they raise directly. A block is never lost, whichever way the model is called.
    """
