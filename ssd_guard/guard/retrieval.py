"""The pre-generation half of a guarded call: documents checked at document scope (the
poisoned ones flagged: dropped or quarantined), the prompt checked, and on ``retrieve``
the retriever called, its documents checked and the prompt decision made again with
retrieval done (``retrieve`` rules left out, the event says ``after_retrieval: true``)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import structlog

from ssd_guard._flow import Call, Flow
from ssd_guard.encoding import check_texts
from ssd_guard.errors import ConfigError
from ssd_guard.guard.context import context_field, format_context
from ssd_guard.guard.decide import Deciding
from ssd_guard.guard.inputs import CallOptions, Check, check_call, retrieved
from ssd_guard.guard.result import GuardResult, RetrievedContext, finish
from ssd_guard.guard.runs import bind, bound_parent
from ssd_guard.policy import Decision
from ssd_guard.scoring.callstats import CallStats

__all__ = ["Retrieval", "sort_context", "split_documents"]

_log = structlog.get_logger("ssd_guard.guard")


def split_documents(
    docs: Sequence[str], decisions: Sequence[Decision]
) -> tuple[list[str], list[str], list[Decision]]:
    """``(kept, flagged, decisions)``: flagged are the documents a ``flag_poisoned`` or
    ``abstain`` rule matched."""
    kept: list[str] = []
    flagged: list[str] = []
    for doc, d in zip(docs, decisions, strict=True):
        (flagged if d.action in ("flag_poisoned", "abstain") else kept).append(doc)
    return kept, flagged, list(decisions)


def sort_context(docs: Sequence[str], decisions: Sequence[Decision]) -> RetrievedContext:
    """*docs* sorted by their decisions, applying each ``flag_poisoned`` rule's ``mode``."""
    ctx = RetrievedContext(decisions=list(decisions))
    for doc, d in zip(docs, decisions, strict=True):
        if d.action == "flag_poisoned":
            if d.params.get("mode") == "quarantine":
                ctx.quarantined.append(doc)
            else:
                ctx.dropped.append(doc)
        elif d.action == "abstain":
            ctx.dropped.append(doc)
        else:
            ctx.documents.append(doc)
    return ctx


def new_result(prompt: str, run_id: str, stats: CallStats | None) -> GuardResult:
    """The result of a call starting on *prompt* in the bound run."""
    return GuardResult(
        output="",
        abstained=False,
        prompt=prompt,
        final_prompt=prompt,
        run_id=run_id,
        parent_run_id=bound_parent(),
        stats=stats if stats is not None else CallStats(),
    )


def after_retrieval(res: GuardResult, ctx: RetrievedContext) -> Check:
    """How the prompt decision is made again once documents were retrieved: on the
    question's entropy (what the student was trained on; no new pass), with the
    ``retrieve`` rules left out (retrieval is done)."""
    return Check(
        "prompt",
        res.prompt,
        [None],
        entropy=res.entropy,
        skip_actions=("retrieve",),
        extra={"after_retrieval": True, **context_field(ctx.documents)},
    )


class Retrieval(Deciding):
    """The guard's document checks, retrieval and pre-generation steps."""

    def _documents_flow(
        self, prompt: str, docs: Sequence[str], opts: CallOptions, entropy: float | None = None
    ) -> Flow[tuple[list[str], list[str], list[Decision]]]:
        docs = check_texts("docs", docs)
        if not docs:
            return [], [], []
        check = Check("document", prompt, list(docs), entropy=entropy, source=opts.source)
        decisions = yield from self._check_flow(check, opts)
        return split_documents(docs, decisions)

    def _screen_flow(
        self, prompt: str, docs: Sequence[str], opts: CallOptions
    ) -> Flow[RetrievedContext]:
        docs = check_texts("docs", docs)
        _, _, decisions = yield from self._documents_flow(prompt, docs, opts)
        return sort_context(docs, decisions)

    def _retrieve_flow(self, question: str, k: int | None) -> Flow[list[str]]:
        if self.retriever is None and self.aretriever is None:
            _log.warning("guard.retrieve.no_retriever", question=question[:200])
            return []
        docs = yield Call(
            functools.partial(self._call_retriever, question),
            functools.partial(self._acall_retriever, question),
        )
        return retrieved(docs, k)

    def _call_retriever(self, question: str) -> Any:
        """The retrieval effect under the sync driver: the sync retriever."""
        if self.retriever is None:
            raise ConfigError("only an async retriever is configured; use arun()")
        docs = self.retriever(question)
        if inspect.isawaitable(docs):
            raise ConfigError("the retriever is async; pass it as aretriever= and use arun()")
        return docs

    async def _acall_retriever(self, question: str) -> Any:
        """The retrieval effect under the async driver: the async retriever, else the sync
        one in a worker thread."""
        if self.aretriever is not None:
            return await self.aretriever(question)
        retriever = self.retriever
        assert retriever is not None  # (checked by the flow)
        docs: Any = await asyncio.to_thread(retriever, question)
        return await docs if inspect.isawaitable(docs) else docs

    def _prepare_flow(self, prompt: str, opts: CallOptions) -> Flow[GuardResult]:
        """The pre-generation steps: check the documents, the prompt, retrieve, check the
        retrieved documents and the prompt again (see :meth:`Guard.prepare
        <ssd_guard.guard.Guard.prepare>`)."""
        prompt, documents = check_call(prompt, opts)
        message = self.abstain_message
        with bind(opts.run_id, opts.parent_run_id) as rid:
            res = new_result(prompt, rid, opts.stats)
            call = dataclasses.replace(opts, stats=res.stats)
            ctx = RetrievedContext()
            if documents:
                ctx.extend((yield from self._screen_flow(prompt, documents, call)))
                if ctx.abstain:
                    return finish(res, ctx, message, abstain=ctx.abstain)
            final_prompt = format_context(prompt, ctx.documents, self.context_template)
            if not opts.check_prompt:
                return finish(res, ctx, message, final_prompt=final_prompt)
            check = Check("prompt", prompt, [None], extra=context_field(ctx.documents))
            (d,) = yield from self._check_flow(check, call)
            ctx.decisions.append(d)
            res.entropy = d.scores.get("entropy")
            if d.action == "retrieve":
                docs = yield from self._retrieve_flow(prompt, d.params.get("k"))
                if docs:
                    # (retrieved documents are checked as such, whatever the call's source)
                    found = dataclasses.replace(call, source="retrieval")
                    ctx.extend((yield from self._screen_flow(prompt, docs, found)))
                    if ctx.abstain:
                        return finish(res, ctx, message, abstain=ctx.abstain)
                    if ctx.documents:
                        final_prompt = format_context(prompt, ctx.documents, self.context_template)
                        (d,) = yield from self._check_flow(after_retrieval(res, ctx), call)
                        ctx.decisions.append(d)
            abstain = d if d.action == "abstain" else None
            return finish(res, ctx, message, final_prompt=final_prompt, abstain=abstain)
