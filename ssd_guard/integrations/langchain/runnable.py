"""Runnables that *act*: ``guard.wrap(model)`` and the zero-extra-pass local chat model.

Both are chain runs of their own (``_call_with_config`` / ``_transform_stream_with_config``),
so they appear in traces, their decisions are audited with the run's ``run_id`` /
``parent_run_id`` and the run's tags and metadata, and the inner model's runs are their
children. Each call is one flow (:mod:`._flow`) run by a sync driver (``invoke`` /
``stream``) or an async one (``ainvoke`` / ``astream``): the drivers are the base class's
(:mod:`._base`), the sampling keywords of a regeneration come from :mod:`._sampling`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import patch_config

from ssd_guard._flow import Call, Emit, Flow
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.integrations.langchain._base import RunArgs, _GuardRunnable
from ssd_guard.integrations.langchain._common import (
    NOSTREAM_TAG,
    WrapsModel,
    answer_can_block,
    answer_text,
    as_chunk,
    last_human,
    merge_chunks,
    result_message,
    text_of,
    to_chunk,
    to_messages,
    with_prompt,
)
from ssd_guard.integrations.langchain._sampling import sampling_kwargs
from ssd_guard.provenance import model_name

__all__ = ["GuardedChatModel", "LocalGuardedChatModel"]

_END = object()


class GuardedChatModel(WrapsModel, _GuardRunnable):
    """A chat model (or LLM) behind a :class:`Guard`: made by :meth:`SSDGuard.wrap`.

    Performs the actions: abstains without calling the model, retrieves and puts the
    documents in the prompt, rejects and regenerates answers, drops poisoned documents.

    **Regeneration.** A rejected answer is regenerated only by *sampling*, when the model
    can be switched to it (see :func:`sampling_kwargs`): a local Hugging Face pipeline is
    called with ``pipeline_kwargs={"do_sample": True, "temperature": T}``, a chat model or
    LLM with a ``temperature`` setting with ``temperature=T`` (``T`` is
    ``guard.regen_temperature``). Any other Runnable (a ``RunnableLambda``, a chain, a
    model without such a setting) is never passed these keywords and never called again:
    calling it again would repeat the draft, so the rule abstains at once (its event
    says ``action: abstain``, ``regeneration: skipped-no-sampling``).

    **Tools, structured output.** :meth:`bind_tools` and :meth:`with_structured_output`
    return this wrapper around the bound model. The answer check reads text content; a
    tool call or a structured output has none, so its answer check is skipped (logged as
    ``guard.answer.unchecked``; the prompt checks and their actions still apply). The
    structured wrapper returns the parsed output as the inner model does (the abstention
    is an ``AIMessage``, as here) and streams it as one item.

    Input: whatever the model takes (a string, messages, a prompt value); the prompt
    checked is the last human message, and retrieved context replaces that message's
    text (see :data:`ssd_guard.guard.DEFAULT_CONTEXT_TEMPLATE`). Output: an ``AIMessage``
    (the abstention message when abstaining); ``response_metadata["ssd_guard"]`` is
    :meth:`GuardResult.to_dict`.

    **Streaming.** When an answer rule of the policy can block this call (an answer-scope
    ``abstain`` / ``reject_answer`` rule whose filters match, an ``abstain`` default, or a
    cache that fails closed), ``stream`` / ``astream`` *hold* the stream: the model's
    chunks are buffered until the answer check passes, then released as they came (the
    last one carries ``response_metadata["ssd_guard"]``); a rejected draft is never
    streamed, an abstention is one chunk. The cost is latency: the first chunk arrives
    when the whole answer has been generated and checked (plus any regeneration), i.e.
    time-to-first-token becomes the full generation time. The inner model call is tagged
    ``nostream`` so that LangGraph's ``stream_mode="messages"`` does not stream its tokens
    either (an agent sees the checked message when the node ends). When no answer rule
    can act, chunks pass through as the model makes them (each one is released when the
    next arrives, so the answer check, audit only, is attached to the last one).
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
        self.guard = guard.for_model(model, source=hidden_state_source)
        self.tags = tuple(tags)
        self.structured = False  # the model returns parsed objects (with_structured_output)

    @property
    def hidden_state_source(self) -> str:
        return self.guard.hidden_state_source

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"SSDGuard[{model_name(self.model)}]" + (suffix or "")

    def _around(self, inner: Runnable[Any, Any], *, structured: bool) -> GuardedChatModel:
        """This wrapper around *inner* (derived from :attr:`model`): the same guard view,
        so the audit's ``guarded_model`` / ``hidden_state_source`` stay the model's."""
        out = GuardedChatModel(inner, self.guard, tags=self.tags)
        out.guard = self.guard
        out.structured = structured
        return out

    def _inner_method(self, name: str) -> Callable[..., Any]:
        method = getattr(self.model, name, None)
        if method is None:
            raise NotImplementedError(
                f"{model_name(self.model)} has no {name}(): guard.wrap() passes it through "
                "to the wrapped model, so wrap a chat model that supports it"
            )
        return cast(Callable[..., Any], method)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> GuardedChatModel:
        """Bind tools on the inner model; the guard stays around it (a tool call has no
        text: its answer check is skipped and logged)."""
        inner: Runnable[Any, Any] = self._inner_method("bind_tools")(tools, **kwargs)
        return self._around(inner, structured=self.structured)

    def with_structured_output(self, schema: Any, **kwargs: Any) -> GuardedChatModel:
        """``model.with_structured_output(schema, **kwargs)`` behind the guard: the prompt
        checks apply (an abstention returns the abstention ``AIMessage``), the output is
        the parsed object (no text: its answer check is skipped and logged)."""
        inner: Runnable[Any, Any] = self._inner_method("with_structured_output")(schema, **kwargs)
        return self._around(inner, structured=True)

    def __repr__(self) -> str:
        return f"GuardedChatModel({self.model!r}, {self.guard!r})"

    # -- the flow --------------------------------------------------------------------------
    @staticmethod
    def _messages_for(
        messages: list[BaseMessage], index: int | None, prompt: str, new_prompt: str
    ) -> list[BaseMessage]:
        if new_prompt == prompt:
            return messages
        if index is None:
            return [*messages, HumanMessage(content=new_prompt)]
        return with_prompt(messages, index, new_prompt)

    def _flow(self, run: RunArgs) -> Flow[AIMessage]:
        input_, config, info, run_manager = run.input, run.config, run.info, run.run_manager
        kwargs, streaming = run.kwargs, run.streaming
        messages = to_messages(input_)
        index = last_human(messages)
        prompt = text_of(messages[index if index is not None else -1]) if messages else ""
        guard, model = self.guard, self.model
        res: GuardResult = yield info.call(
            lambda: guard.prepare(prompt, **info.run_kw),
            lambda: guard.aprepare(prompt, **info.run_kw),
        )
        if res.abstained:
            message = result_message(res)
            if streaming:
                yield Emit(to_chunk(message))
            return message

        hold = answer_can_block(guard, info.tags, info.run_name)
        child = patch_config(config, callbacks=run_manager.get_child())
        if hold:  # LangGraph's stream_mode="messages" must not stream an unchecked draft
            child["tags"] = [*(child.get("tags") or []), NOSTREAM_TAG]

        as_stream = streaming
        if self.structured:  # parsed objects: one item, never a chunk stream
            streaming = False
        # Only keywords the model accepts are passed; one that cannot sample is never
        # called again after reject_answer (can_sample = False: see Guard.complete).
        regen = sampling_kwargs(model, kwargs, guard.regen_temperature)
        can_sample = regen is not None and guard.regen_temperature > 0

        def call_args(
            p: str, temperature: float | None
        ) -> tuple[list[BaseMessage], dict[str, Any]]:
            kw = kwargs
            if temperature is not None and can_sample:
                kw = {**kwargs, **(sampling_kwargs(model, kwargs, temperature) or {})}
            return self._messages_for(messages, index, prompt, p), kw

        drafts: list[list[AIMessageChunk]] = []  # the chunks of each generation

        def generate(p: str, temperature: float | None = None) -> Any:
            msgs, kw = call_args(p, temperature)
            if not streaming:
                return model.invoke(msgs, child, **kw)
            drafts.append([as_chunk(c) for c in model.stream(msgs, child, **kw)])
            return merge_chunks(drafts[-1])

        async def agenerate(p: str, temperature: float | None = None) -> Any:
            msgs, kw = call_args(p, temperature)
            if not streaming:
                return await model.ainvoke(msgs, child, **kw)
            drafts.append([as_chunk(c) async for c in model.astream(msgs, child, **kw)])
            return merge_chunks(drafts[-1])

        if not can_sample:
            generate.can_sample = False  # type: ignore[attr-defined]
            agenerate.can_sample = False  # type: ignore[attr-defined]

        if streaming and not hold:  # nothing can stop the answer: pass the chunks through
            streamed = yield from self._pass_through(*call_args(res.final_prompt, None), child)
            drafts.append(streamed[-1:])  # the others are out already
            merged = merge_chunks(streamed)

            def streamed_answer(_prompt: str) -> AIMessageChunk:
                return merged

            res = yield info.call(
                lambda: guard.complete(res, streamed_answer, extract=answer_text, **info.kw),
                lambda: guard.acomplete(res, streamed_answer, extract=answer_text, **info.kw),
            )
        else:
            res = yield info.call(
                lambda: guard.complete(res, generate, extract=answer_text, **info.kw),
                lambda: guard.acomplete(res, agenerate, extract=answer_text, **info.kw),
            )
        if self.structured and not res.abstained and res.raw is not None:
            if as_stream:
                yield Emit(res.raw)
            return cast(AIMessage, res.raw)  # the parsed object, as the inner model gives it
        message = result_message(res)
        if as_stream and self.structured:
            yield Emit(message)
        elif streaming:
            yield from self._release(message, res, drafts[-1] if drafts else [])
        return message

    def _pass_through(
        self, msgs: list[BaseMessage], kw: dict[str, Any], child: RunnableConfig
    ) -> Flow[list[AIMessageChunk]]:
        """Stream the model's chunks out as they come, all but the last (it waits for the
        answer check, whose result it carries); return them all."""
        model = self.model
        stream = yield Call(
            lambda: iter(model.stream(msgs, child, **kw)),
            lambda: _aiter(model.astream(msgs, child, **kw)),
        )
        chunks: list[AIMessageChunk] = []
        while True:
            item = yield Call(lambda: next(stream, _END), lambda: anext(stream, _END))
            if item is _END:
                return chunks
            if chunks:
                yield Emit(chunks[-1])
            chunks.append(as_chunk(item))

    @staticmethod
    def _release(message: AIMessage, res: GuardResult, chunks: list[AIMessageChunk]) -> Flow[None]:
        if res.abstained or not chunks:
            yield Emit(to_chunk(message))
            return
        for chunk in chunks[:-1]:
            yield Emit(chunk)
        last = chunks[-1]
        meta = {**last.response_metadata, "ssd_guard": message.response_metadata["ssd_guard"]}
        yield Emit(last.model_copy(update={"response_metadata": meta}))


async def _aiter(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    return stream


class LocalGuardedChatModel(_GuardRunnable):
    """A LangChain Runnable over :class:`ssd_guard.local.GuardedLocalModel`: the zero-extra-
    pass guard for LangChain chains and loops.

    Input is anything a chat model takes (a string, messages, a prompt value); the last
    human message is the question (earlier messages are not shown to the model: the
    student reads prompts in its own distillation format). The output is an
    ``AIMessage`` with the guard's result under ``response_metadata["ssd_guard"]`` (the
    abstention message when the guard abstains). ``invoke`` / ``ainvoke`` / ``batch`` /
    ``stream`` (one chunk, released once the answer is checked) work as for any Runnable,
    and each call is a traced chain run whose ids, tags and metadata the audit records::

        chat = LocalGuardedChatModel(GuardedLocalModel(guard))
        (ChatPromptTemplate.from_template("{q}") | chat).invoke({"q": "Who wrote Hamlet?"})
    """

    def __init__(self, local: Any, *, tags: Sequence[str] = ()) -> None:
        self.local = local
        self.tags = tuple(tags)

    def get_name(self, suffix: str | None = None, *, name: str | None = None) -> str:
        return name or f"LocalGuardedChatModel[{self.local.model_id}]" + (suffix or "")

    def __repr__(self) -> str:
        return f"LocalGuardedChatModel({self.local!r})"

    @staticmethod
    def _question(input_: Any) -> str:
        messages = to_messages(input_)
        index = last_human(messages)
        if index is None:
            raise ValueError("LocalGuardedChatModel needs a human message to answer")
        return text_of(messages[index])

    def _flow(self, run: RunArgs) -> Flow[AIMessage]:
        input_, info, streaming = run.input, run.info, run.streaming
        question, local = self._question(input_), self.local
        res: GuardResult = yield info.call(
            lambda: local.invoke(question, **info.run_kw),
            lambda: local.ainvoke(question, **info.run_kw),
        )
        message = result_message(res)
        if streaming:
            yield Emit(to_chunk(message))
        return message
