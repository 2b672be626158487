"""The public :class:`Guard` (see :mod:`ssd_guard.guard`): each public method is a thin
driver of a flow written once (sync: :func:`~ssd_guard._flow.drive`, async:
:func:`~ssd_guard._flow.adrive`), taking the call's keyword arguments as one
:class:`~ssd_guard.guard.inputs.CallOptions`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ssd_guard._flow import Flow, adrive, drive
from ssd_guard.guard import runs
from ssd_guard.guard.inputs import CallOptions, Check
from ssd_guard.guard.regeneration import Regeneration
from ssd_guard.guard.result import GuardResult, RetrievedContext
from ssd_guard.guard.retrieval import Retrieval
from ssd_guard.policy import Decision
from ssd_guard.scoring.callstats import CallStats

__all__ = ["Guard"]


class Guard(Retrieval, Regeneration):
    """Score every LLM call with SSD signals and apply a policy (framework-free).

    Parameters
    ----------
    scorer:
        any :class:`~ssd_guard.scoring.base.RiskScorer` (e.g. ``SSDScorer.load("bundled")``);
        ``None`` loads what the policy names: its ``student`` artifact, on its
        ``proxy_model`` when it names one (see :meth:`SSDScorer.from_policy
        <ssd_guard.scoring.ssd.SSDScorer.from_policy>`).
    policy:
        a :class:`~ssd_guard.policy.Policy` or the path of a YAML policy.
    cache:
        a :class:`~ssd_guard.cache.ScoreCache`; default: the one ``policy.cache`` describes.
    retriever / aretriever:
        ``question -> documents`` (sync / async) used by the ``retrieve`` action.
    hidden_state_source:
        recorded in every audit event: ``"guarded-model"`` (the hidden state is the guarded
        model's own), ``"proxy:<model id>"`` (a local model stands in for an API-only one)
        or ``"scorer"`` (no guarded model known). Default: decided by
        :func:`~ssd_guard.provenance.resolve_hidden_state_source` (``proxy:<scorer model>``
        when the policy names a ``proxy_model``, else ``scorer``; :meth:`for_model` decides
        it for a known guarded model).
    context_template:
        how retrieved documents are put in the prompt (see :func:`format_context`).
    regen_temperature:
        the ``temperature=`` a regeneration after ``reject_answer`` passes to a ``generate``
        that accepts one (default :data:`REGEN_TEMPERATURE`; ``0`` turns sampling off).
    pair_scorers:
        post-generation scorers run beside the student on scope ``answer``, each under its
        ``signal`` (``semgrad``, ``hybridgrad``, ``draft_eu``: see
        :class:`~ssd_guard.scoring.base.PairScorer`); only the signals a rule reads are
        computed. A policy that reads one no scorer provides is refused here, as is one
        that reads ``risk`` with a student that has no risk model.
    screener:
        the :class:`~ssd_guard.screening.DocumentScreener` that computes the document-scope
        signals ``relevance`` and ``instruction``, only when a document rule reads one
        (batched over the documents of one call, cached with the other scores). Default:
        one built at first use on the scorer's own sentence embedder
        (:meth:`DocumentScreener.for_scorer
        <ssd_guard.screening.DocumentScreener.for_scorer>`; the shared MiniLM when the
        scorer has none), so nothing is loaded twice.
    """

    # ------------------------------------------------------------------ run context
    def bind(
        self, run_id: str | None = None, parent_run_id: str | None = None
    ) -> contextlib.AbstractContextManager[str]:
        """Bind a run (audit ``run_id`` / ``parent_run_id``) for the calls inside.

        Without *run_id*, the run already bound (by an outer ``bind`` or
        :func:`ssd_guard.audit.bind_run`) is reused, else a new uuid4 is made. Yields the
        run id.
        """
        return runs.bind(run_id, parent_run_id)

    # ------------------------------------------------------------------ checks
    def check_prompt(
        self,
        prompt: str,
        *,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Decision:
        """Pre-generation check: the prompt's entropy -> a prompt-scope decision.

        *stats* (a :class:`CallStats`) carries what the call computed to its later checks
        (pass the same one to :meth:`check_answer`: the prompt's hidden state is reused)."""
        opts = CallOptions(tags=tags, run_name=run_name, stats=stats)
        return drive(self._check_flow(Check("prompt", prompt, [None]), opts))[0]

    def check_answer(
        self,
        prompt: str,
        answer: str,
        *,
        entropy: float | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Decision:
        """Post-generation check: the answer's loglik (plus the prompt's entropy when a
        rule needs it, or when given as *entropy*) -> an answer-scope decision."""
        flow = self._check_flow(
            Check("answer", prompt, [answer], entropy=entropy),
            CallOptions(tags=tags, run_name=run_name, stats=stats),
        )
        return drive(flow)[0]

    def check_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        entropy: float | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> tuple[list[str], list[str], list[Decision]]:
        """Document-scope check of *docs* (one batched cache lookup and scorer call).

        Returns ``(kept, flagged, decisions)``: flagged documents are those a
        ``flag_poisoned`` (or ``abstain``) rule matched; one decision per document.
        """
        opts = CallOptions(source=source, tags=tags, run_name=run_name, stats=stats)
        return drive(self._documents_flow(prompt, docs, opts, entropy))

    async def acheck_prompt(
        self,
        prompt: str,
        *,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Decision:
        """Async :meth:`check_prompt`."""
        opts = CallOptions(tags=tags, run_name=run_name, stats=stats)
        return (await adrive(self._check_flow(Check("prompt", prompt, [None]), opts)))[0]

    async def acheck_answer(
        self,
        prompt: str,
        answer: str,
        *,
        entropy: float | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Decision:
        """Async :meth:`check_answer`."""
        flow = self._check_flow(
            Check("answer", prompt, [answer], entropy=entropy),
            CallOptions(tags=tags, run_name=run_name, stats=stats),
        )
        return (await adrive(flow))[0]

    async def acheck_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        entropy: float | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> tuple[list[str], list[str], list[Decision]]:
        """Async :meth:`check_documents`."""
        opts = CallOptions(source=source, tags=tags, run_name=run_name, stats=stats)
        return await adrive(self._documents_flow(prompt, docs, opts, entropy))

    # ------------------------------------------------------------------ retrieval
    def screen_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> RetrievedContext:
        """:meth:`check_documents`, applying each ``flag_poisoned`` rule's ``mode``."""
        opts = CallOptions(source=source, tags=tags, run_name=run_name, stats=stats)
        return drive(self._screen_flow(prompt, docs, opts))

    async def ascreen_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> RetrievedContext:
        """Async :meth:`screen_documents`."""
        opts = CallOptions(source=source, tags=tags, run_name=run_name, stats=stats)
        return await adrive(self._screen_flow(prompt, docs, opts))

    def retrieve(self, question: str, k: int | None = None) -> list[str]:
        """Call the retriever (no check); ``[]`` and a warning when there is none."""
        return drive(self._retrieve_flow(question, k))

    async def aretrieve(self, question: str, k: int | None = None) -> list[str]:
        """Async :meth:`retrieve` (a sync retriever runs in a worker thread)."""
        return await adrive(self._retrieve_flow(question, k))

    # ------------------------------------------------------------------ run
    def prepare(
        self,
        prompt: str,
        *,
        documents: Sequence[str] | None = None,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        check_prompt: bool = True,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        stats: CallStats | None = None,
    ) -> GuardResult:
        """The pre-generation half of :meth:`run`: check *documents*, the prompt, and act
        on ``abstain`` / ``retrieve``. The result is either abstained or carries the
        :attr:`~GuardResult.final_prompt` to generate from (pass it to :meth:`complete`).

        The question (*prompt*) is what is scored, never the prompt with documents (see
        the module doc); *stats* (default: a new :class:`CallStats`) is kept on the result
        for :meth:`complete`."""
        opts = CallOptions(
            documents=documents,
            source=source,
            check_prompt=check_prompt,
            tags=tags,
            run_name=run_name,
            run_id=run_id,
            parent_run_id=parent_run_id,
            stats=stats,
        )
        return drive(self._prepare_flow(prompt, opts))

    async def aprepare(
        self,
        prompt: str,
        *,
        documents: Sequence[str] | None = None,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        check_prompt: bool = True,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        stats: CallStats | None = None,
    ) -> GuardResult:
        """Async :meth:`prepare`."""
        opts = CallOptions(
            documents=documents,
            source=source,
            check_prompt=check_prompt,
            tags=tags,
            run_name=run_name,
            run_id=run_id,
            parent_run_id=parent_run_id,
            stats=stats,
        )
        return await adrive(self._prepare_flow(prompt, opts))

    def complete(
        self,
        res: GuardResult,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        deterministic: bool | None = None,
    ) -> GuardResult:
        """The generation half of :meth:`run`: ``generate(res.final_prompt)``, check the
        answer, regenerate on ``reject_answer`` (at most ``max_regenerations`` times; see
        the module doc for how), then accept or abstain. *res* (from :meth:`prepare`) is
        updated and returned; the answers are scored against its question with its
        :attr:`~GuardResult.stats` (the question's hidden state is not computed again)."""
        opts = CallOptions(
            extract=extract, tags=tags, run_name=run_name, deterministic=deterministic
        )
        return drive(self._complete_flow(res, generate, opts))

    async def acomplete(
        self,
        res: GuardResult,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        deterministic: bool | None = None,
    ) -> GuardResult:
        """Async :meth:`complete`; *generate* may be sync or return an awaitable."""
        opts = CallOptions(
            extract=extract, tags=tags, run_name=run_name, deterministic=deterministic
        )
        return await adrive(self._complete_flow(res, generate, opts))

    def _run_flow(
        self, prompt: str, generate: Callable[..., Any], opts: CallOptions
    ) -> Flow[GuardResult]:
        """The whole guarded call: :meth:`_prepare_flow`, then :meth:`_complete_flow`."""
        with runs.bind(opts.run_id, opts.parent_run_id) as rid:
            bound = dataclasses.replace(opts, run_id=rid, parent_run_id=None)
            res = yield from self._prepare_flow(prompt, bound)
            return (yield from self._complete_flow(res, generate, opts))

    def run(
        self,
        prompt: str,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None = None,
        documents: Sequence[str] | None = None,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        check_prompt: bool = True,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        deterministic: bool | None = None,
        stats: CallStats | None = None,
    ) -> GuardResult:
        """Guard one generation: check, act, generate, check, act (see the module doc).

        ``generate(prompt) -> str`` produces the answer; for another return type give
        ``extract(raw) -> str | None`` (``None`` = nothing to check, e.g. a tool call: it is
        accepted as is). *documents* (from a RAG chain, a tool...) are checked at document
        scope and put in the prompt. ``check_prompt=False`` skips the prompt check (e.g.
        a later step of the same turn). *run_id* defaults to the bound run, else a uuid.
        ``deterministic=True`` says *generate* always gives the same answer (it is then not
        called again after ``reject_answer``); a *generate* with a ``temperature=`` keyword
        is called with ``temperature=regen_temperature`` to regenerate. *stats* (default:
        a new :class:`CallStats`) holds what the call computes, e.g. the question's hidden
        state: computed once, by the first check that needs it.
        """
        opts = CallOptions(
            extract=extract,
            documents=documents,
            source=source,
            check_prompt=check_prompt,
            tags=tags,
            run_name=run_name,
            run_id=run_id,
            parent_run_id=parent_run_id,
            deterministic=deterministic,
            stats=stats,
        )
        return drive(self._run_flow(prompt, generate, opts))

    async def arun(
        self,
        prompt: str,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None = None,
        documents: Sequence[str] | None = None,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        check_prompt: bool = True,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        deterministic: bool | None = None,
        stats: CallStats | None = None,
    ) -> GuardResult:
        """Async :meth:`run`; *generate* may be sync or return an awaitable."""
        opts = CallOptions(
            extract=extract,
            documents=documents,
            source=source,
            check_prompt=check_prompt,
            tags=tags,
            run_name=run_name,
            run_id=run_id,
            parent_run_id=parent_run_id,
            deterministic=deterministic,
            stats=stats,
        )
        return await adrive(self._run_flow(prompt, generate, opts))
