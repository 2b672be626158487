"""The public :class:`Guard` (see :mod:`ssd_guard.guard`): each public method is a thin
driver of a flow written once (sync: :func:`~ssd_guard._flow.run`, async:
:func:`~ssd_guard._flow.arun`), taking the call's keyword arguments as one
:class:`~ssd_guard.guard.inputs.CallOptions`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Unpack

from ssd_guard import _flow as flow
from ssd_guard._flow import Flow
from ssd_guard.guard import runs
from ssd_guard.guard.inputs import (
    CallOptions,
    Check,
    CheckKwargs,
    CompleteKwargs,
    DocumentsKwargs,
    PrepareKwargs,
    RunKwargs,
)
from ssd_guard.guard.regeneration import Regeneration
from ssd_guard.guard.result import GuardResult, RetrievedContext
from ssd_guard.guard.retrieval import Retrieval
from ssd_guard.policy import Decision

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
    # Each twin takes its keyword arguments as one TypedDict (see :mod:`.inputs`): the
    # options of a call are listed once, in :class:`CallOptions`, not in every signature.
    def check_prompt(self, prompt: str, **kw: Unpack[CheckKwargs]) -> Decision:
        """Pre-generation check: the prompt's entropy -> a prompt-scope decision.

        Keywords: ``tags``, ``run_name``, ``stats`` (a :class:`CallStats` carrying what
        the call computed to its later checks: pass the same one to :meth:`check_answer`
        and the prompt's hidden state is reused)."""
        return flow.run(self._check_flow(Check("prompt", prompt, [None]), CallOptions(**kw)))[0]

    def check_answer(
        self, prompt: str, answer: str, *, entropy: float | None = None, **kw: Unpack[CheckKwargs]
    ) -> Decision:
        """Post-generation check: the answer's loglik (plus the prompt's entropy when a
        rule needs it, or when given as *entropy*) -> an answer-scope decision."""
        check = Check("answer", prompt, [answer], entropy=entropy)
        return flow.run(self._check_flow(check, CallOptions(**kw)))[0]

    def check_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        entropy: float | None = None,
        **kw: Unpack[DocumentsKwargs],
    ) -> tuple[list[str], list[str], list[Decision]]:
        """Document-scope check of *docs* (one batched cache lookup and scorer call);
        ``source=`` says where they come from (default ``"retrieval"``).

        Returns ``(kept, flagged, decisions)``: flagged documents are those a
        ``flag_poisoned`` (or ``abstain``) rule matched; one decision per document.
        """
        return flow.run(self._documents_flow(prompt, docs, CallOptions(**kw), entropy))

    async def acheck_prompt(self, prompt: str, **kw: Unpack[CheckKwargs]) -> Decision:
        """Async :meth:`check_prompt`."""
        check = Check("prompt", prompt, [None])
        return (await flow.arun(self._check_flow(check, CallOptions(**kw))))[0]

    async def acheck_answer(
        self, prompt: str, answer: str, *, entropy: float | None = None, **kw: Unpack[CheckKwargs]
    ) -> Decision:
        """Async :meth:`check_answer`."""
        check = Check("answer", prompt, [answer], entropy=entropy)
        return (await flow.arun(self._check_flow(check, CallOptions(**kw))))[0]

    async def acheck_documents(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        entropy: float | None = None,
        **kw: Unpack[DocumentsKwargs],
    ) -> tuple[list[str], list[str], list[Decision]]:
        """Async :meth:`check_documents`."""
        return await flow.arun(self._documents_flow(prompt, docs, CallOptions(**kw), entropy))

    # ------------------------------------------------------------------ retrieval
    def screen_documents(
        self, prompt: str, docs: Sequence[str], **kw: Unpack[DocumentsKwargs]
    ) -> RetrievedContext:
        """:meth:`check_documents`, applying each ``flag_poisoned`` rule's ``mode``."""
        return flow.run(self._screen_flow(prompt, docs, CallOptions(**kw)))

    async def ascreen_documents(
        self, prompt: str, docs: Sequence[str], **kw: Unpack[DocumentsKwargs]
    ) -> RetrievedContext:
        """Async :meth:`screen_documents`."""
        return await flow.arun(self._screen_flow(prompt, docs, CallOptions(**kw)))

    def retrieve(self, question: str, k: int | None = None) -> list[str]:
        """Call the retriever (no check); ``[]`` and a warning when there is none."""
        return flow.run(self._retrieve_flow(question, k))

    async def aretrieve(self, question: str, k: int | None = None) -> list[str]:
        """Async :meth:`retrieve` (a sync retriever runs in a worker thread)."""
        return await flow.arun(self._retrieve_flow(question, k))

    # ------------------------------------------------------------------ run
    def prepare(self, prompt: str, **kw: Unpack[PrepareKwargs]) -> GuardResult:
        """The pre-generation half of :meth:`run`: check the ``documents``, the prompt, and
        act on ``abstain`` / ``retrieve``. The result is either abstained or carries the
        :attr:`~GuardResult.final_prompt` to generate from (pass it to :meth:`complete`).

        The question (*prompt*) is what is scored, never the prompt with documents (see
        the module doc); ``stats`` (default: a new :class:`CallStats`) is kept on the
        result for :meth:`complete`. Keywords: those of :meth:`run` but ``extract`` and
        ``deterministic``."""
        return flow.run(self._prepare_flow(prompt, CallOptions(**kw)))

    async def aprepare(self, prompt: str, **kw: Unpack[PrepareKwargs]) -> GuardResult:
        """Async :meth:`prepare`."""
        return await flow.arun(self._prepare_flow(prompt, CallOptions(**kw)))

    def complete(
        self, res: GuardResult, generate: Callable[..., Any], **kw: Unpack[CompleteKwargs]
    ) -> GuardResult:
        """The generation half of :meth:`run`: ``generate(res.final_prompt)``, check the
        answer, regenerate on ``reject_answer`` (at most ``max_regenerations`` times; see
        the module doc for how), then accept or abstain. *res* (from :meth:`prepare`) is
        updated and returned; the answers are scored against its question with its
        :attr:`~GuardResult.stats` (the question's hidden state is not computed again).
        Keywords: ``extract``, ``tags``, ``run_name``, ``deterministic`` (as in :meth:`run`)."""
        return flow.run(self._complete_flow(res, generate, CallOptions(**kw)))

    async def acomplete(
        self, res: GuardResult, generate: Callable[..., Any], **kw: Unpack[CompleteKwargs]
    ) -> GuardResult:
        """Async :meth:`complete`; *generate* may be sync or return an awaitable."""
        return await flow.arun(self._complete_flow(res, generate, CallOptions(**kw)))

    def _run_flow(
        self, prompt: str, generate: Callable[..., Any], opts: CallOptions
    ) -> Flow[GuardResult]:
        """The whole guarded call: :meth:`_prepare_flow`, then :meth:`_complete_flow`."""
        with runs.bind(opts.run_id, opts.parent_run_id) as rid:
            bound = dataclasses.replace(opts, run_id=rid, parent_run_id=None)
            res = yield from self._prepare_flow(prompt, bound)
            return (yield from self._complete_flow(res, generate, opts))

    def run(
        self, prompt: str, generate: Callable[..., Any], **kw: Unpack[RunKwargs]
    ) -> GuardResult:
        """Guard one generation: check, act, generate, check, act (see the module doc).

        ``generate(prompt) -> str`` produces the answer. The keywords (all optional, see
        :class:`~ssd_guard.guard.inputs.RunKwargs`): for another return type give
        ``extract(raw) -> str | None`` (``None`` = nothing to check, e.g. a tool call: it is
        accepted as is). ``documents`` (from a RAG chain, a tool...) are checked at document
        scope (``source``: ``"retrieval"``, ``"tool"`` or ``"cache"``) and put in the
        prompt. ``check_prompt=False`` skips the prompt check (e.g. a later step of the same
        turn). ``tags`` / ``run_name`` select rules and are audited; ``run_id`` defaults to
        the bound run, else a uuid (``parent_run_id`` is recorded with it).
        ``deterministic=True`` says *generate* always gives the same answer (it is then not
        called again after ``reject_answer``); a *generate* with a ``temperature=`` keyword
        is called with ``temperature=regen_temperature`` to regenerate. ``stats`` (default:
        a new :class:`CallStats`) holds what the call computes, e.g. the question's hidden
        state: computed once, by the first check that needs it.
        """
        return flow.run(self._run_flow(prompt, generate, CallOptions(**kw)))

    async def arun(
        self, prompt: str, generate: Callable[..., Any], **kw: Unpack[RunKwargs]
    ) -> GuardResult:
        """Async :meth:`run`; *generate* may be sync or return an awaitable."""
        return await flow.arun(self._run_flow(prompt, generate, CallOptions(**kw)))
