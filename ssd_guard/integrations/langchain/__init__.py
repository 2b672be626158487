"""LangChain integration: a callback handler, a Runnable wrapper and an agent middleware.

Three ways to put a :class:`~ssd_guard.guard.Guard` around a LangChain model, from the
least to the most invasive:

``SSDGuard`` (callback handler, :mod:`.callbacks`)
    ``model.invoke(..., config={"callbacks": [guard]})``. Every chat-model / LLM start is
    scored (prompt = the last human message) and every end (the answer); decisions are
    audited. A callback cannot change what the model does, so a *blocking* decision
    raises :class:`~ssd_guard.errors.GuardBlockedError`; it cannot hold a stream back
    either, so when an answer rule can block, a streamed call raises
    :class:`GuardStreamingError` on its first token. Works with ``invoke`` and ``ainvoke``
    (``AsyncSSDGuard`` is the same handler).

``guard.wrap(model)`` (:class:`GuardedChatModel`, :mod:`.runnable`)
    Performs the actions: abstains without calling the model, retrieves and puts the
    documents in the prompt, rejects and regenerates answers, drops poisoned documents.
    Returns an ``AIMessage`` (the abstention message when abstaining) whose
    ``response_metadata["ssd_guard"]`` holds the decisions. ``stream`` holds the chunks
    until the answer check passes when an answer rule can block.

``guard.middleware()`` / :class:`SSDGuardMiddleware` (:mod:`.middleware`)
    ``before_model`` checks each new user turn, ``wrap_model_call`` puts retrieved
    documents in the request and checks final answers (reject -> the handler is called
    again), ``wrap_tool_call`` replaces poisoned tool outputs with a quarantine notice.
    ``langchain`` (v1) is an optional extra: the middleware module is imported on first
    use.

``LocalGuardedChatModel(GuardedLocalModel(guard))`` (:mod:`.runnable`)
    The zero-extra-pass guard as a LangChain Runnable: the local model generates under
    the guard and the scores come from its own prefill.

Every path audits LangChain's own ``run_id`` / ``parent_run_id`` and the run's tags and
metadata (``metadata`` in the audit event), and runs one truncated prefill of the
scorer's base model per guarded call (the prompt check's hidden state is reused by the
answer check: see :class:`~ssd_guard.scoring.callstats.CallStats`). Whose hidden states
are read is recorded as ``hidden_state_source``, decided by
:func:`ssd_guard.provenance.resolve_hidden_state_source`: ``guarded-model`` when the
guarded model is a local Hugging Face model (``ChatHuggingFace`` /
``HuggingFacePipeline``) that *is* the scorer's base model, else ``proxy:<scorer model>``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ssd_guard.errors import require_extra

require_extra("langchain_core", "langchain", "The LangChain integration")

from ssd_guard.integrations.langchain._common import (  # noqa: E402
    QUARANTINE_NOTICE,
    TURN_KEY,
    GuardStreamingError,
    answer_can_block,
    local_hf_model,
    resolve_hidden_state_source,
    result_message,
)
from ssd_guard.integrations.langchain.callbacks import AsyncSSDGuard, SSDGuard  # noqa: E402
from ssd_guard.integrations.langchain.runnable import GuardedChatModel, LocalGuardedChatModel  # noqa: E402

if TYPE_CHECKING:
    from ssd_guard.integrations.langchain.middleware import SSDGuardMiddleware, SSDGuardState

__all__ = [
    "QUARANTINE_NOTICE",
    "TURN_KEY",
    "AsyncSSDGuard",
    "GuardStreamingError",
    "GuardedChatModel",
    "LocalGuardedChatModel",
    "SSDGuard",
    "SSDGuardMiddleware",
    "SSDGuardState",
    "answer_can_block",
    "local_hf_model",
    "resolve_hidden_state_source",
    "result_message",
]

_LAZY = frozenset({"SSDGuardMiddleware", "SSDGuardState"})
_result_message = result_message  # the old private name, kept importable


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # needs the optional `langchain` package
        return getattr(importlib.import_module(f"{__name__}.middleware"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
