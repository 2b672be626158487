"""The framework-free guard: score -> decide -> act -> audit.

:class:`Guard` ties a :class:`~ssd_guard.scoring.base.RiskScorer`, a
:class:`~ssd_guard.policy.Policy` and a :class:`~ssd_guard.cache.ScoreCache` together:

* ``check_prompt`` / ``check_answer`` / ``check_documents`` score one scope (through the
  cache), let the policy decide, and emit exactly one ``guard.decision`` audit event per
  decision (one per document for document lists);
* ``run(prompt, generate)`` performs the actions around a generation callable:

  ``abstain``
      the policy's abstention message is returned and ``generate`` is never called;
  ``retrieve``
      the retriever is called with the question, its documents are checked against the
      question (document scope: poisoned ones are flagged), the kept ones are put in the
      prompt with :data:`DEFAULT_CONTEXT_TEMPLATE`, and the prompt decision is made again
      with retrieval done (``retrieve`` rules left out, the event says
      ``after_retrieval: true``): an ``abstain`` there abstains, anything else proceeds;
  ``reject_answer``
      the answer is discarded and ``generate`` is called again, at most
      ``max_regenerations`` times; if the last answer is still rejected the guard abstains.
      A greedy generator would only repeat the rejected answer, so a regeneration samples:
      when ``generate`` accepts a ``temperature=`` keyword it is called with
      ``temperature=regen_temperature`` (default :data:`REGEN_TEMPERATURE`, the teacher's
      sampling temperature). A generator declared deterministic (``run(...,
      deterministic=True)``, or a ``deterministic = True`` attribute on ``generate``) is not
      called again: the guard abstains at once. One declared non-deterministic
      (``deterministic=False``: it samples by itself) is called again as it is; so is any
      other generator, but the guard stops as soon as it repeats a rejected answer. A
      generator with a ``can_sample = False`` attribute (a model the integration cannot
      switch to sampling) is not called again either. Each event of the rule says what
      happens next in ``regeneration``: ``sample`` (with ``regen_temperature``) or
      ``same-settings`` (the event's action is ``reject_answer``; a regeneration's event
      carries its ``attempt``, 1, 2...), or ``skipped-deterministic``,
      ``skipped-no-sampling``, ``stopped-identical`` or ``exhausted``
      (``max_regenerations`` reached): nothing more is tried, the guard abstains and the
      event's action is ``abstain`` (its ``rule`` is the ``reject_answer`` rule). A
      regenerated answer is always checked again, also when it repeats the draft;
  ``flag_poisoned``
      the document is left out of the prompt: dropped (``mode: drop``) or kept aside in
      :attr:`GuardResult.quarantined` (``mode: quarantine``);
  ``allow`` / ``log_only``
      pass through (both are audited).

**What is scored.** The student was distilled on bare questions, so the guard scores
only those: the prompt's entropy is the question's (documents given with ``documents=``
or retrieved never enter the scored text), and documents and answers are scored against
the question's predicted answer distribution, also when the model was given the
documents. The events of such a call say how many documents were in the model's prompt
(``context_documents``).

**One prefill per call.** Each call (:meth:`Guard.run`, :meth:`Guard.prepare` +
:meth:`Guard.complete`) carries a :class:`~ssd_guard.scoring.callstats.CallStats`: the
question's hidden state is computed once, by the first check that needs it, and reused by
the document checks, the answer check and every regeneration's answer check (a scorer
that accepts ``stats=``, such as :class:`~ssd_guard.scoring.ssd.SSDScorer`). A prompt cut
to the encoder's ``max_tokens`` puts ``truncated: true`` on the call's events.

Every argument is checked: a prompt / answer that is not a ``str`` (or holds a lone
surrogate), or a single string where a list of strings is expected (``documents``,
``tags``, a retriever's result), raises :class:`~ssd_guard.errors.GuardInputError` naming
the argument. In fail-open mode a cache failure absorbed during a check is recorded on the
decision event as ``cache_error`` (``connection``, ``timeout``, ``circuit-open``...).

Every method has an ``async`` twin (``acheck_prompt``, ..., ``arun``). Each flow is
written once, as a generator that yields its effects (a cache read / write, a scorer
pass, a retriever call, a ``generate`` call) as :class:`~ssd_guard.cache.Call` objects,
the way httpx writes its auth flows once: the sync method drives it with
:func:`~ssd_guard._flow.drive`, the async one with :func:`~ssd_guard._flow.adrive`, where
scoring runs in a worker thread so the event loop is never blocked by the model.

Nothing here imports LangChain; :mod:`ssd_guard.integrations.langchain` builds on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from ssd_guard._flow import Call, Flow, adrive, drive
from ssd_guard.audit import bind_run, emit_decision
from ssd_guard.cache import ScoreCache, cache_from_config, collect_errors, make_key
from ssd_guard.encoding import check_text, check_texts
from ssd_guard.errors import CacheUnavailableError, ConfigError, GuardInputError
from ssd_guard.policy import Decision, Policy, Scope, check_policy_references, load_policy
from ssd_guard.policy.schema import ANSWER_SIGNALS, DOCUMENT_SIGNALS, PAIR_SIGNALS
from ssd_guard.provenance import model_name, resolve_hidden_state_source, validate_source
from ssd_guard.scoring.base import PairScorer, RiskScorer
from ssd_guard.scoring.callstats import CallStats

if TYPE_CHECKING:
    from ssd_guard.screening import DocumentScreener

__all__ = [
    "CACHE_BLOCK_RULE",
    "DEFAULT_CONTEXT_TEMPLATE",
    "REGEN_TEMPERATURE",
    "CallStats",
    "Guard",
    "GuardResult",
    "RetrievedContext",
    "format_context",
]

#: How retrieved documents are put in the prompt (``{documents}`` is one ``[i] text`` line
#: per kept document, ``{question}`` the user's text). The question stays last so a
#: ``Question: ... Answer:`` template around the whole text still ends on the question.
DEFAULT_CONTEXT_TEMPLATE = (
    "Use the following context to answer the question.\n\n"
    "Context:\n{documents}\n\n"
    "Question: {question}"
)

#: The ``rule`` recorded when a call is blocked because the cache is down in closed mode.
CACHE_BLOCK_RULE = "cache-unavailable"

#: Temperature of a regeneration after ``reject_answer`` when ``generate`` accepts a
#: ``temperature=`` keyword: the teacher's sampling temperature (the SSD signals describe
#: the model's sampled answers), so a rejected greedy answer is not simply repeated.
REGEN_TEMPERATURE = 1.0

Retriever = Callable[[str], Sequence[str]]
AsyncRetriever = Callable[[str], Awaitable[Sequence[str]]]

_log = structlog.get_logger("ssd_guard.guard")
_MAX_TRACKED_RUNS = 4096


def format_context(
    question: str, documents: Sequence[str], template: str = DEFAULT_CONTEXT_TEMPLATE
) -> str:
    """Put *documents* in front of *question* with *template* (no documents: the question)."""
    if not documents:
        return question
    lines = "\n".join(f"[{i}] {' '.join(doc.split())}" for i, doc in enumerate(documents, 1))
    return template.format(documents=lines, question=question)


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
# One set of checks for the guard and the scorers (:mod:`ssd_guard.encoding`): a text is
# a str that encodes as UTF-8, a list of texts never a single string.
_check_text = check_text
_check_texts = check_texts


def _check_meta(tags: Any, run_name: Any) -> None:
    _check_texts("tags", tags)
    if run_name is not None:
        _check_text("run_name", run_name)


def _retrieved(value: Any, k: int | None) -> list[str]:
    """A retriever's result as a list of str (items converted with ``str``)."""
    name = "retriever result"
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise GuardInputError(
            name, f"the retriever must return a list of documents, got {type(value).__name__}"
        )
    docs = [_check_text(f"{name}[{i}]", str(d)) for i, d in enumerate(value)]
    return docs[:k] if k else docs


def _accepts_temperature(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("temperature")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


@functools.lru_cache(maxsize=256)
def _takes_stats_fn(fn: Callable[..., Any]) -> bool:
    try:
        param = inspect.signature(fn).parameters.get("stats")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def _stats_kw(method: Callable[..., Any], stats: CallStats) -> dict[str, Any]:
    """``{"stats": stats}`` when the scorer *method* accepts the call's statistics."""
    fn = getattr(method, "__func__", method)
    try:
        takes = _takes_stats_fn(fn)
    except TypeError:  # unhashable callable
        takes = False
    return {"stats": stats} if takes else {}


#: ``sample``: pass ``temperature=``; ``skip``: deterministic, never call again; ``fixed``:
#: the generator cannot be switched to sampling (``can_sample = False``), never call again;
#: ``own``: the generator samples by itself; ``repeat``: unknown, call again, stop on a
#: repeated answer.
RegenMode = Literal["sample", "skip", "fixed", "own", "repeat"]

#: The ``regeneration`` values after which ``generate`` is called again; after any other
#: one the ``reject_answer`` rule falls through to abstaining (its event says ``abstain``).
_REGENERATING = frozenset({"sample", "same-settings"})


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------
@dataclass
class RetrievedContext:
    """Documents checked at document scope, and what became of them."""

    documents: list[str] = field(default_factory=list)
    """Kept: these go into the prompt."""
    quarantined: list[str] = field(default_factory=list)
    """Flagged with ``mode: quarantine``: kept aside, out of the prompt."""
    dropped: list[str] = field(default_factory=list)
    """Flagged with ``mode: drop`` (or an ``abstain`` rule): out of the prompt."""
    decisions: list[Decision] = field(default_factory=list)

    @property
    def abstain(self) -> Decision | None:
        return next((d for d in self.decisions if d.action == "abstain"), None)

    def extend(self, other: RetrievedContext) -> None:
        self.documents += other.documents
        self.quarantined += other.quarantined
        self.dropped += other.dropped
        self.decisions += other.decisions


@dataclass
class GuardResult:
    """What :meth:`Guard.run` did and what the agent gets (:attr:`output`)."""

    output: str
    """The accepted answer, or the abstention message."""
    abstained: bool
    prompt: str
    """The prompt as given."""
    final_prompt: str
    """The prompt passed to ``generate`` (with retrieved context, if any)."""
    run_id: str
    parent_run_id: str | None = None
    answer: str | None = None
    """The accepted answer text (``None`` when abstaining or not a text answer)."""
    decisions: list[Decision] = field(default_factory=list)
    """Every decision, in order (each one was audited)."""
    documents: list[str] = field(default_factory=list)
    """Documents put in the prompt."""
    quarantined: list[str] = field(default_factory=list)
    """Documents flagged as poisoned and kept aside (``mode: quarantine``)."""
    dropped: int = 0
    """How many documents were flagged and dropped."""
    rejected: list[str] = field(default_factory=list)
    """Answers discarded by ``reject_answer``."""
    generations: int = 0
    """How many times ``generate`` was called."""
    raw: Any = None
    """What ``generate`` returned for the accepted answer (e.g. an ``AIMessage``)."""
    entropy: float | None = None
    """Entropy of :attr:`prompt` (the question: documents put in the prompt are never
    scored with it), reused by the answer checks."""
    regeneration: str | None = None
    """After the last ``reject_answer``: ``sample``, ``same-settings``,
    ``skipped-deterministic``, ``skipped-no-sampling``, ``stopped-identical`` or
    ``exhausted`` (see the module doc)."""
    stats: CallStats | None = field(default=None, repr=False, compare=False)
    """What this call computed (the question's hidden state...), reused by its later
    checks (:meth:`Guard.complete`)."""

    @property
    def truncated(self) -> bool:
        """Whether a prompt of this call was cut to the encoder's ``max_tokens``."""
        return bool(self.stats is not None and self.stats.truncated)

    @property
    def decision(self) -> Decision | None:
        """The last decision: the one that settled the outcome."""
        return self.decisions[-1] if self.decisions else None

    @property
    def action(self) -> str:
        """``abstain`` when abstaining, else the last decision's action (``allow`` if none)."""
        if self.abstained:
            return "abstain"
        return self.decisions[-1].action if self.decisions else "allow"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (used as ``response_metadata["ssd_guard"]`` by integrations)."""
        last = self.decision
        return {
            "action": self.action,
            "abstained": self.abstained,
            "rule": last.rule if last else None,
            "scores": dict(last.scores) if last else {},
            "run_id": self.run_id,
            "generations": self.generations,
            "documents": len(self.documents),
            "quarantined": list(self.quarantined),
            "dropped": self.dropped,
            "rejected": list(self.rejected),
            "decisions": [d.to_dict() for d in self.decisions],
        }


# --------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------
class _CacheBlocked(Exception):
    def __init__(self, cause: CacheUnavailableError, cache_ms: float) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.cache_ms = cache_ms


class _StepCounter:
    """Step numbers per run id (bounded LRU; shared by copies of a guard)."""

    def __init__(self, max_runs: int = _MAX_TRACKED_RUNS) -> None:
        self._steps: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_runs

    def next(self, run_id: str) -> int:
        with self._lock:
            step = self._steps.pop(run_id, 0) + 1
            self._steps[run_id] = step
            while len(self._steps) > self._max:
                self._steps.popitem(last=False)
            return step


@dataclass
class _Lookup:
    """One scope check's cache lookup plan and results."""

    prompt: str
    items: list[str | None]
    """``None``: the prompt itself (entropy); a string: an answer / document (loglik)."""
    want_entropy: bool
    scope: str = "prompt"
    want_risk: bool = False
    """the prompt's combined risk (``pre`` variant) is needed too"""
    answer_needs: frozenset[str] = frozenset()
    """answer signals beyond the SSD ones this check needs (``risk``, pair scorers'; on
    scope ``document`` the screening signals ``relevance`` / ``instruction``)"""
    risk: float | None = None
    entropy: float | None = None
    entropy_hit: bool | None = None
    logliks: list[float] = field(default_factory=list)
    loglik_hits: list[bool] = field(default_factory=list)
    answer_scores: list[dict[str, float]] = field(default_factory=list)
    """Every answer signal of each item (``loglik`` and, from an SSD scorer, ``pmi`` and
    ``consensus``)."""
    cache_ms: float = 0.0
    scoring_ms: float = 0.0
    cache_error: str | None = None
    """Kind of the cache failure absorbed in fail-open mode (``connection``...)."""
    cache_error_detail: str | None = None
    keys: list[str] = field(default_factory=list)
    entropy_key: str | None = None
    stats: CallStats = field(default_factory=CallStats)
    """The call's statistics (the prompt's hidden state, computed once per call)."""


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------------------
# Guard
# --------------------------------------------------------------------------------------
class Guard:
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

    def __init__(
        self,
        scorer: RiskScorer | None,
        policy: Policy | str | Path,
        *,
        cache: ScoreCache | None = None,
        retriever: Retriever | None = None,
        aretriever: AsyncRetriever | None = None,
        hidden_state_source: str | None = None,
        context_template: str = DEFAULT_CONTEXT_TEMPLATE,
        regen_temperature: float = REGEN_TEMPERATURE,
        pair_scorers: Sequence[PairScorer] = (),
        screener: DocumentScreener | None = None,
    ) -> None:
        if not (isinstance(regen_temperature, int | float) and regen_temperature >= 0):
            raise ConfigError(f"regen_temperature must be a number >= 0, got {regen_temperature!r}")
        self.regen_temperature = float(regen_temperature)
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        # The student / proxy the policy names must exist, also when a scorer is given
        # (as `ssd-guard check-policy` requires): a policy that names a missing one is
        # refused, never silently run on another student.
        check_policy_references(self.policy)
        if scorer is None:
            from ssd_guard.scoring.ssd import SSDScorer

            scorer = SSDScorer.from_policy(self.policy)
        self.scorer: RiskScorer = scorer
        self.cache: ScoreCache = (
            cache if cache is not None else cache_from_config(self.policy.cache)
        )
        self.retriever = retriever
        self.aretriever = aretriever
        self.context_template = context_template
        self.guarded_model: str | None = None
        # What decides hidden_state_source (see for_model); the label itself is derived.
        self._explicit_source = (
            validate_source(hidden_state_source) if hidden_state_source else None
        )
        self._model: Any = None
        self._proxy = self.policy.proxy_model is not None
        self.hidden_state_source = self._resolve_source()
        self._steps = _StepCounter()
        self._entropy_scopes = {
            rule.scope
            for rule in self.policy.rules
            if rule.when is not None and "entropy" in rule.when.metrics()
        }
        self.pair_scorers: dict[str, PairScorer] = {}
        for ps in pair_scorers:
            if not isinstance(ps, PairScorer):
                raise ConfigError(f"pair_scorers: {ps!r} is not a PairScorer (score_pairs)")
            self.pair_scorers[str(ps.signal)] = ps
        used = {
            (rule.scope, m)
            for rule in self.policy.rules
            if rule.when is not None
            for m in rule.when.metrics()
        }
        self._prompt_risk = ("prompt", "risk") in used
        self._answer_needs = frozenset(
            m for scope, m in used if scope == "answer" and m in ("risk", *PAIR_SIGNALS)
        )
        self._document_needs = frozenset(
            m for scope, m in used if scope == "document" and m in DOCUMENT_SIGNALS
        )
        if screener is not None and not callable(getattr(screener, "score", None)):
            raise ConfigError(f"screener: {screener!r} is not a DocumentScreener (score)")
        self._screener: DocumentScreener | None = screener
        self._screener_lock = threading.Lock()
        # A signal no scorer provides would leave its rule silent (every decision logging
        # it in missing_scores): refuse the policy now, naming who would provide it.
        for index, rule in enumerate(self.policy.rules):
            for metric in sorted(rule.when.metrics() if rule.when is not None else ()):
                lacking = self._unprovided(rule.scope, metric)
                if lacking is not None:
                    raise ConfigError(
                        f"{self.policy.source}: rules[{index}] '{rule.name}' (scope "
                        f"{rule.scope}) reads '{metric}', but {lacking}"
                    )

    def _unprovided(self, scope: str, metric: str) -> str | None:
        """Why no scorer of this guard provides *metric* at *scope*, or ``None``: entropy
        and loglik are every scorer's (``score_prompts`` / ``score_answers``), pmi and
        consensus need ``answer_signals``, risk a risk model and ``prompt_signals`` (scope
        prompt) / ``answer_signals``, a pair signal its pair scorer; the document screener
        is built on demand."""
        kind = type(getattr(self.scorer, "scorer", self.scorer)).__name__
        if metric in ANSWER_SIGNALS and metric != "loglik":
            if not callable(getattr(self.scorer, "answer_signals", None)):
                return (
                    f"the scorer ({kind}) has no answer_signals method, which computes "
                    "pmi and consensus: use a scorer that has one (SSDScorer, the SSD "
                    "student, does), or read loglik instead"
                )
        elif metric == "risk":
            if getattr(self.scorer, "risk_model", None) is None:
                return (
                    f"the student ({kind}) has no risk model (risk.safetensors in its "
                    "artifact): run `ssd-guard fit-risk`"
                )
            method = "prompt_signals" if scope == "prompt" else "answer_signals"
            if not callable(getattr(self.scorer, method, None)):
                return (
                    f"the scorer ({kind}) has no {method} method, which computes risk on "
                    f"scope {scope}: use a scorer that has one (SSDScorer with a risk model)"
                )
        elif metric in PAIR_SIGNALS and metric not in self.pair_scorers:
            provider = {"draft_eu": "DraftEUScorer"}.get(metric, "SemGradScorer / HybridGradScorer")
            return (
                f"no scorer for it was given: pass Guard(pair_scorers=[...]) with a scorer "
                f"whose signal is {metric!r} ({provider} in ssd_guard.scoring)"
            )
        return None

    # ------------------------------------------------------------------ properties
    @property
    def screener(self) -> DocumentScreener:
        """The document screener (built at first use; see the ``screener`` parameter)."""
        if self._screener is None:
            with self._screener_lock:
                if self._screener is None:
                    from ssd_guard.screening import DocumentScreener

                    self._screener = DocumentScreener.for_scorer(self.scorer)
        return self._screener

    @property
    def needs_token_stats(self) -> bool:
        """True when an answer rule reads ``risk``: a guarded generation then records its
        token statistics for the combined risk's ``post_gen`` variant (otherwise the
        decode loop skips that work)."""
        return "risk" in self._answer_needs

    @property
    def has_blocking_rules(self) -> bool:
        """True when some decision can stop a call (an abstain / reject rule, an
        ``abstain`` default, or a cache configured to fail closed)."""
        return (
            any(rule.action in ("abstain", "reject_answer") for rule in self.policy.rules)
            or self.policy.default_action == "abstain"
            or self._fail_mode == "closed"
        )

    @property
    def abstain_message(self) -> str:
        return self.policy.abstain_message

    @property
    def _fail_mode(self) -> str:
        mode = getattr(self.cache, "fail_mode", None)
        return str(mode) if mode in ("open", "closed") else self.policy.cache.fail_mode

    def _resolve_source(self) -> str:
        return resolve_hidden_state_source(
            self.scorer, model=self._model, explicit=self._explicit_source, proxy=self._proxy
        )

    def for_model(
        self,
        model: Any = None,
        *,
        source: str | None = None,
        name: str | None = None,
        integration: bool = True,
    ) -> Guard:
        """A view of this guard for the calls of *model* (scorer, cache and step counters
        are shared).

        ``hidden_state_source`` is decided by
        :func:`~ssd_guard.provenance.resolve_hidden_state_source` from *model* (``None``:
        keep the model this view knows), an explicit *source* (else this guard's), and
        *integration* (``True``: the guard stands around a model, so with none known the
        source is ``proxy:<scorer model>``). *name* is the guarded model's id in the
        audit (default: *model*'s name).
        """
        other = copy.copy(self)
        if model is not None:
            other._model = model
        if source:
            other._explicit_source = validate_source(source)
        other._proxy = self._proxy or integration
        if name is not None:
            other.guarded_model = name
        elif model is not None:
            other.guarded_model = model_name(model)
        other.hidden_state_source = other._resolve_source()
        return other

    def with_hidden_state_source(self, label: str, *, guarded_model: str | None = None) -> Guard:
        """A view of this guard recording *label* as ``hidden_state_source`` (unless the
        guarded model it knows is the scorer's base model: see :meth:`for_model`)."""
        return self.for_model(source=label, name=guarded_model, integration=False)

    def __repr__(self) -> str:
        return (
            f"Guard(scorer={getattr(self.scorer, 'name', type(self.scorer).__name__)!r}, "
            f"policy={self.policy.name!r}, cache={self.cache!r}, "
            f"hidden_state_source={self.hidden_state_source!r})"
        )

    # ------------------------------------------------------------------ run context
    @contextlib.contextmanager
    def bind(self, run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
        """Bind a run (audit ``run_id`` / ``parent_run_id``) for the calls inside.

        Without *run_id*, the run already bound (by an outer ``bind`` or
        :func:`ssd_guard.audit.bind_run`) is reused, else a new uuid4 is made. Yields the
        run id.
        """
        bound = structlog.contextvars.get_contextvars().get("run_id")
        if bound is not None and (
            run_id is None or (str(run_id) == str(bound) and parent_run_id is None)
        ):
            yield str(bound)
            return
        if run_id is None:
            run_id = uuid.uuid4().hex
        with bind_run(str(run_id), None if parent_run_id is None else str(parent_run_id)):
            yield str(run_id)

    @staticmethod
    def _current_run() -> tuple[str, str | None]:
        ctx = structlog.contextvars.get_contextvars()
        parent = ctx.get("parent_run_id")
        return str(ctx["run_id"]), None if parent is None else str(parent)

    # ------------------------------------------------------------------ cache plan
    def _key(self, prompt: str, answer: str | None, salt: str | None = None) -> str:
        namespace = getattr(self.cache, "namespace", self.policy.cache.namespace)
        return make_key(
            namespace if salt is None else f"{namespace}:{salt}",
            student_fingerprint=self.scorer.fingerprint,
            model_id=self.scorer.model_id,
            layer=int(self.scorer.layer),
            prompt=prompt,
            answer=answer,
        )

    def _plan(
        self,
        scope: Scope,
        prompt: str,
        items: Sequence[str | None],
        entropy: float | None,
        stats: CallStats | None,
    ) -> _Lookup:
        """What a check looks up: the prompt's entropy unless given (a prompt check, or a
        rule of *scope* that reads it) and one answer entry per item."""
        want_entropy = entropy is None and (scope == "prompt" or scope in self._entropy_scopes)
        plan = _Lookup(
            prompt=prompt,
            items=list(items),
            want_entropy=want_entropy,
            scope=scope,
            want_risk=scope == "prompt" and self._prompt_risk,
            answer_needs=(
                self._answer_needs
                if scope == "answer"
                else self._document_needs
                if scope == "document"
                else frozenset()
            ),
            stats=stats if stats is not None else CallStats(),
        )
        if entropy is not None:
            plan.entropy, plan.entropy_hit = float(entropy), True
        if want_entropy:
            plan.entropy_key = self._key(prompt, None)
        # Screened documents: their entries are keyed on the screener's version as well.
        salt = self._screening_salt() if scope == "document" and self._document_needs else None
        plan.keys = [self._key(prompt, a, salt) for a in plan.items if a is not None]
        return plan

    def _screening_salt(self) -> str:
        if self._screener is not None:
            return f"scr-{getattr(self._screener, 'version', 'custom')}"
        from ssd_guard.screening import default_screening_version

        return f"scr-{default_screening_version()}"

    def _all_keys(self, plan: _Lookup) -> list[str]:
        return ([plan.entropy_key] if plan.entropy_key else []) + plan.keys

    def _cache_failed(self, exc: CacheUnavailableError, t0: float, plan: _Lookup) -> None:
        if self._fail_mode == "closed":
            raise _CacheBlocked(exc, _ms(t0)) from exc
        self._degraded(plan, "unavailable", str(exc))

    @staticmethod
    def _degraded(plan: _Lookup, kind: str, detail: str | None = None) -> None:
        """Record a cache failure absorbed in fail-open mode (first one wins)."""
        if plan.cache_error is not None:
            return
        plan.cache_error, plan.cache_error_detail = kind, detail
        _log.warning("guard.cache.degraded", cache_error=kind, error=detail, fail_mode="open")

    @staticmethod
    def _cached_score(hit: Mapping[str, Any] | None, name: str, key: str) -> float | None:
        """The cached score *name* of *hit*, or None (a miss) unless the entry is exactly
        ``{name: finite number}``; a malformed entry is logged."""
        if hit is None:
            return None
        value = hit.get(name) if isinstance(hit, Mapping) else None
        if (
            isinstance(hit, Mapping)
            and len(hit) == 1
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
            return float(value)
        _log.warning(
            "guard.cache.invalid_value",
            key=key,
            expected=f"{{{name!r}: finite float}}",
            got=repr(hit)[:200],
        )
        return None

    def _apply_cached(self, plan: _Lookup, cached: Sequence[Mapping[str, Any] | None]) -> None:
        values = list(cached)
        if plan.entropy_key:
            got = self._cached_prompt_scores(values.pop(0), plan.entropy_key)
            if got is not None and (not plan.want_risk or "risk" in got):
                plan.entropy, plan.entropy_hit = got["entropy"], True
                plan.risk = got.get("risk")
        plan.logliks = [float("nan")] * len(plan.keys)
        plan.loglik_hits = [False] * len(plan.keys)
        plan.answer_scores = [{} for _ in plan.keys]
        for i, hit in enumerate(values):
            got = self._cached_answer_scores(hit, plan.keys[i])
            if got is not None and plan.answer_needs <= set(got):
                plan.logliks[i], plan.loglik_hits[i] = got["loglik"], True
                plan.answer_scores[i] = got

    @classmethod
    def _cached_prompt_scores(
        cls, hit: Mapping[str, Any] | None, key: str
    ) -> dict[str, float] | None:
        """A prompt entry: ``{"entropy": x}`` or ``{"entropy": x, "risk": y}``, finite
        numbers; anything else is a logged miss."""
        if isinstance(hit, Mapping) and set(hit) == {"entropy", "risk"}:
            risk = cls._cached_score({"risk": hit["risk"]}, "risk", key)
            entropy = cls._cached_score({"entropy": hit["entropy"]}, "entropy", key)
            if risk is None or entropy is None:
                return None
            return {"entropy": entropy, "risk": risk}
        entropy = cls._cached_score(hit, "entropy", key)
        return None if entropy is None else {"entropy": entropy}

    @staticmethod
    def _cached_answer_scores(hit: Mapping[str, Any] | None, key: str) -> dict[str, float] | None:
        """An answer entry: ``loglik`` plus optional ``pmi`` / ``consensus`` / ``risk`` /
        the pair scorers' signals / the screening signals (``relevance``, ``instruction``),
        every value a finite number and no other key; anything else is a logged miss. An
        entry written before a signal existed stays valid: a check that needs a signal the
        entry lacks scores the text again."""
        if hit is None:
            return None
        ok = (
            isinstance(hit, Mapping)
            and "loglik" in hit
            and set(hit) <= {*ANSWER_SIGNALS, "risk", *PAIR_SIGNALS, *DOCUMENT_SIGNALS}
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in hit.values()
            )
        )
        if ok:
            return {str(k): float(v) for k, v in hit.items()}
        _log.warning(
            "guard.cache.invalid_value",
            key=key,
            expected="{'loglik': finite float, optional 'pmi' / 'consensus' / 'risk' / "
            "'semgrad' / 'hybridgrad' / 'draft_eu' / 'relevance' / 'instruction'}",
            got=repr(hit)[:200],
        )
        return None

    def _misses(self, plan: _Lookup) -> tuple[bool, list[int]]:
        need_entropy = plan.want_entropy and plan.entropy_hit is not True
        answers = [a for a in plan.items if a is not None]
        missing = [i for i in range(len(answers)) if not plan.loglik_hits[i]]
        return need_entropy, missing

    def _compute(self, plan: _Lookup) -> dict[str, dict[str, float]]:
        """Score the misses (one scorer call per signal); returns the new cache entries."""
        need_entropy, missing = self._misses(plan)
        answers = [a for a in plan.items if a is not None]
        new: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        scorer, stats = self.scorer, plan.stats
        if need_entropy:
            prompt_fn = getattr(scorer, "prompt_signals", None)
            entry: dict[str, float]
            if plan.want_risk and callable(prompt_fn):
                got = prompt_fn([plan.prompt], **_stats_kw(prompt_fn, stats))
                entry = {k: float(v[0]) for k, v in got.items() if k in ("entropy", "risk")}
            else:
                kw = _stats_kw(scorer.score_prompts, stats)
                entry = {"entropy": float(scorer.score_prompts([plan.prompt], **kw)[0])}
            plan.entropy, plan.risk = entry["entropy"], entry.get("risk")
            plan.entropy_hit = False
            assert plan.entropy_key is not None
            if all(math.isfinite(v) for v in entry.values()):  # only finite scores are cached
                new[plan.entropy_key] = entry
        if len(plan.answer_scores) != len(plan.keys):
            plan.answer_scores = [{} for _ in plan.keys]
        if missing:
            texts = [[answers[i] for i in missing]]
            signals_fn = getattr(scorer, "answer_signals", None)
            if callable(signals_fn):
                # One pass gives every answer signal (loglik, pmi, consensus; risk).
                kw = _stats_kw(signals_fn, stats)
                if "risk" in plan.answer_needs:
                    kw["with_risk"] = True
                out_all = signals_fn([plan.prompt], texts, **kw)
                keep = (*ANSWER_SIGNALS, "risk")
                rows = {k: _first_row(v) for k, v in out_all.items() if k in keep}
            else:
                kw = _stats_kw(scorer.score_answers, stats)
                rows = {"loglik": _first_row(scorer.score_answers([plan.prompt], texts, **kw))}
            for sig in sorted(plan.answer_needs & set(PAIR_SIGNALS)):
                # Post-generation scorers beside the student (SemGrad, draft models...).
                pairs = self.pair_scorers[sig].score_pairs([plan.prompt] * len(texts[0]), texts[0])
                rows[sig] = [float(v) for v in pairs]
            screening = [s for s in DOCUMENT_SIGNALS if s in plan.answer_needs]
            if plan.scope == "document" and screening:
                # Relevance to the question / instruction-likeness, one batched pass.
                got = self.screener.score(plan.prompt, texts[0], signals=screening)
                rows.update({k: [float(v) for v in vals] for k, vals in got.items()})
            for n, i in enumerate(missing):
                entry = {k: float(v[n]) for k, v in rows.items()}
                plan.logliks[i] = entry["loglik"]
                plan.answer_scores[i] = entry
                if all(math.isfinite(v) for v in entry.values()):
                    new[plan.keys[i]] = entry
        plan.scoring_ms += _ms(t0)
        return new

    def _lookup_flow(self, plan: _Lookup) -> Flow[_Lookup]:
        """A check's cache lookup, written once: read the entries, score the misses (in a
        worker thread under the async driver, so the event loop is never blocked by the
        model), write the new entries."""
        keys = self._all_keys(plan)
        if not keys:  # every score was given (e.g. a decision made again): nothing to do
            self._apply_cached(plan, [])
            return plan
        cache = self.cache
        t0 = time.perf_counter()
        with collect_errors() as absorbed:
            try:
                cached: Sequence[Mapping[str, Any] | None] = yield Call(
                    lambda: cache.get_many(keys), lambda: cache.aget_many(keys)
                )
            except CacheUnavailableError as exc:
                self._cache_failed(exc, t0, plan)
                cached = [None] * len(keys)
        if absorbed:
            self._degraded(plan, absorbed[0])
        plan.cache_ms += _ms(t0)
        self._apply_cached(plan, cached)
        need_entropy, missing = self._misses(plan)
        new: dict[str, dict[str, float]] = {}
        if need_entropy or missing:
            compute = functools.partial(self._compute, plan)
            new = yield Call(compute, functools.partial(asyncio.to_thread, compute))
        if new and plan.cache_error is None:
            t1 = time.perf_counter()
            with collect_errors() as absorbed:
                try:
                    yield Call(lambda: cache.set_many(new), lambda: cache.aset_many(new))
                except CacheUnavailableError as exc:
                    self._cache_failed(exc, t1, plan)
            if absorbed:
                self._degraded(plan, absorbed[0])
            plan.cache_ms += _ms(t1)
        return plan

    # ------------------------------------------------------------------ decide + audit
    def _calibration(self, scope: str) -> dict[str, list[float]] | None:
        """The calibration values quantile thresholds read at *scope*: the student's, the
        pair scorers', and ``risk`` as the variant computed there (``pre`` before
        generation, ``post`` after; a guarded generation's ``post_gen`` values are read on
        ``post``'s scale)."""
        base = getattr(self.scorer, "calibration", None) or {}
        if not self.pair_scorers and "risk:pre" not in base:
            return base or None  # the common case: the student's values as they are
        # A shallow merge (the value lists are shared, never copied: policies treat them
        # as immutable), made per decision so a scorer's later changes are seen.
        out = dict(base)
        for ps in self.pair_scorers.values():
            out.update(ps.calibration or {})
        variant = "risk:pre" if scope == "prompt" else "risk:post"
        if variant in out:
            out["risk"] = out[variant]
        return out or None

    def _emit(
        self,
        decision: Decision,
        *,
        cache_hit: bool | None,
        latency_ms: Mapping[str, float],
        tags: Sequence[str],
        run_name: str | None,
        **extra: Any,
    ) -> None:
        run_id, parent = self._current_run()
        fields: dict[str, Any] = {}
        if tags:
            fields["tags"] = list(tags)
        if run_name is not None:
            fields["run_name"] = run_name
        if decision.missing_scores:
            fields["missing_scores"] = list(decision.missing_scores)
        if decision.params:
            fields["params"] = dict(decision.params)
        if self.guarded_model is not None:
            fields["guarded_model"] = self.guarded_model
        fields.update({k: v for k, v in extra.items() if v is not None})
        emit_decision(
            run_id=run_id,
            parent_run_id=parent,
            step=self._steps.next(run_id),
            scope=decision.scope,
            model_id=self.scorer.model_id,
            hidden_state_source=self.hidden_state_source,
            student_fingerprint=self.scorer.fingerprint,
            policy_name=self.policy.name,
            policy_sha256=self.policy.sha256,
            scores=decision.scores,
            thresholds=decision.thresholds,
            rule=decision.rule,
            action=decision.action,
            cache_hit=cache_hit,
            latency_ms=latency_ms,
            **fields,
        )

    def _decide(
        self,
        scope: Scope,
        plan: _Lookup,
        t0: float,
        *,
        source: str | None,
        tags: Sequence[str],
        run_name: str | None,
        extra: Mapping[str, Any] | None = None,
        on_reject: Callable[[Decision], tuple[Decision, Mapping[str, Any]]] | None = None,
        skip_actions: Sequence[str] = (),
    ) -> list[Decision]:
        """One decision (and one audit event) per item of *plan*; *on_reject* turns a
        ``reject_answer`` decision into the one recorded (``abstain`` when nothing more is
        tried) and adds fields to its event; rules whose action is in *skip_actions* are
        left out."""
        calibration = self._calibration(scope)
        n = max(1, len(plan.keys)) if scope != "prompt" else 1
        share = 1.0 / n  # a batch's cache / scoring time is shared by its documents
        before_ms = _ms(t0) * share
        decisions: list[Decision] = []
        for i in range(n):
            scores: dict[str, float | None] = {}
            hits: list[bool] = []
            if plan.entropy is not None:
                scores["entropy"] = plan.entropy
                if plan.want_entropy:
                    hits.append(bool(plan.entropy_hit))
            if scope == "prompt" and plan.risk is not None:
                scores["risk"] = plan.risk
            if scope != "prompt":
                scores["loglik"] = plan.logliks[i]
                if plan.answer_scores:
                    for k, v in plan.answer_scores[i].items():
                        # (an entry shared by an answer and a document of the same text
                        # may hold screening signals: they belong to scope document)
                        if scope == "document" or k not in DOCUMENT_SIGNALS:
                            scores[k] = v
                hits.append(plan.loglik_hits[i])
            d0 = time.perf_counter()
            decision = self.policy.decide(
                scope,
                scores,
                calibration=calibration,
                tags=tags,
                run_name=run_name,
                source=source,
                skip_actions=skip_actions,
            )
            decide_ms = _ms(d0)
            per_doc: dict[str, Any] = {}
            if scope == "document":
                per_doc = {"source": source, "doc_index": i, "batch_size": n}
            if on_reject is not None and decision.action == "reject_answer":
                decision, regen = on_reject(decision)
                per_doc.update(regen)
            if plan.stats.truncated:
                per_doc["truncated"] = True
            self._emit(
                decision,
                # None: nothing was looked up (every score was given)
                cache_hit=all(hits) if hits else None,
                latency_ms={
                    "scoring": plan.scoring_ms * share,
                    "cache": plan.cache_ms * share,
                    "decide": decide_ms,
                    "total": before_ms + decide_ms,
                },
                tags=tags,
                run_name=run_name,
                cache_error=plan.cache_error,
                cache_error_detail=plan.cache_error_detail,
                **per_doc,
                **(extra or {}),
            )
            decisions.append(decision)
        return decisions

    def _blocked(
        self,
        scope: Scope,
        exc: _CacheBlocked,
        t0: float,
        *,
        tags: Sequence[str],
        run_name: str | None,
        source: str | None,
    ) -> CacheUnavailableError:
        decision = Decision(
            action="abstain",
            rule=CACHE_BLOCK_RULE,
            scope=scope,
            scores={},
            message=self.policy.abstain_message,
            policy_name=self.policy.name,
        )
        self._emit(
            decision,
            cache_hit=False,
            latency_ms={"scoring": 0.0, "cache": exc.cache_ms, "total": _ms(t0)},
            tags=tags,
            run_name=run_name,
            source=source,
            error=str(exc.cause),
            fail_mode="closed",
        )
        err = CacheUnavailableError(
            f"call blocked: the score cache is unavailable and the policy's cache.fail_mode "
            f"is 'closed' ({exc.cause})"
        )
        err.decision = decision  # type: ignore[attr-defined]
        return err

    # ------------------------------------------------------------------ check flow
    @contextlib.contextmanager
    def _checking(
        self,
        scope: Scope,
        prompt: str,
        items: Sequence[str | None],
        entropy: float | None,
        source: str | None,
        tags: Sequence[str],
        run_name: str | None,
        stats: CallStats | None,
    ) -> Iterator[tuple[_Lookup, float]]:
        """The part of a check shared by the sync and async paths: check the arguments,
        bind the run, plan the cache lookup, and turn a fail-closed cache error into the
        blocking decision."""
        _check_text("prompt", prompt)
        if scope != "prompt":  # (a prompt check's item is None: the prompt itself)
            for i, item in enumerate(items):
                _check_text("answer" if scope == "answer" else f"docs[{i}]", item)
        _check_meta(tags, run_name)
        t0 = time.perf_counter()
        with self.bind():
            plan = self._plan(scope, prompt, items, entropy, stats)
            try:
                yield plan, t0
            except _CacheBlocked as exc:
                raise self._blocked(
                    scope, exc, t0, tags=tags, run_name=run_name, source=source
                ) from exc.cause

    def _check_flow(
        self,
        scope: Scope,
        prompt: str,
        items: Sequence[str | None],
        *,
        entropy: float | None = None,
        source: str | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        extra: Mapping[str, Any] | None = None,
        on_reject: Callable[[Decision], tuple[Decision, Mapping[str, Any]]] | None = None,
        stats: CallStats | None = None,
        skip_actions: Sequence[str] = (),
    ) -> Flow[list[Decision]]:
        """One scope check: look the scores up (scoring the misses), decide, audit."""
        with self._checking(scope, prompt, items, entropy, source, tags, run_name, stats) as (
            plan,
            t0,
        ):
            yield from self._lookup_flow(plan)
            return self._decide(
                scope,
                plan,
                t0,
                source=source,
                tags=tags,
                run_name=run_name,
                extra=extra,
                on_reject=on_reject,
                skip_actions=skip_actions,
            )

    def _documents_flow(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        entropy: float | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Flow[tuple[list[str], list[str], list[Decision]]]:
        docs = _check_texts("docs", docs)
        if not docs:
            return [], [], []
        decisions = yield from self._check_flow(
            "document",
            prompt,
            list(docs),
            entropy=entropy,
            source=source,
            tags=tags,
            run_name=run_name,
            stats=stats,
        )
        return _split(docs, decisions)

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
        flow = self._check_flow("prompt", prompt, [None], tags=tags, run_name=run_name, stats=stats)
        return drive(flow)[0]

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
            "answer", prompt, [answer], entropy=entropy, tags=tags, run_name=run_name, stats=stats
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
        return drive(
            self._documents_flow(
                prompt,
                docs,
                source=source,
                entropy=entropy,
                tags=tags,
                run_name=run_name,
                stats=stats,
            )
        )

    async def acheck_prompt(
        self,
        prompt: str,
        *,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Decision:
        """Async :meth:`check_prompt`."""
        flow = self._check_flow("prompt", prompt, [None], tags=tags, run_name=run_name, stats=stats)
        return (await adrive(flow))[0]

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
            "answer", prompt, [answer], entropy=entropy, tags=tags, run_name=run_name, stats=stats
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
        return await adrive(
            self._documents_flow(
                prompt,
                docs,
                source=source,
                entropy=entropy,
                tags=tags,
                run_name=run_name,
                stats=stats,
            )
        )

    # ------------------------------------------------------------------ retrieval
    def _sort_context(self, docs: Sequence[str], decisions: Sequence[Decision]) -> RetrievedContext:
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

    def _screen_flow(
        self,
        prompt: str,
        docs: Sequence[str],
        *,
        source: Literal["retrieval", "tool", "cache"] = "retrieval",
        tags: Sequence[str] = (),
        run_name: str | None = None,
        stats: CallStats | None = None,
    ) -> Flow[RetrievedContext]:
        docs = _check_texts("docs", docs)
        _, _, decisions = yield from self._documents_flow(
            prompt, docs, source=source, tags=tags, run_name=run_name, stats=stats
        )
        return self._sort_context(docs, decisions)

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
        return drive(
            self._screen_flow(
                prompt, docs, source=source, tags=tags, run_name=run_name, stats=stats
            )
        )

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
        return await adrive(
            self._screen_flow(
                prompt, docs, source=source, tags=tags, run_name=run_name, stats=stats
            )
        )

    def _retrieve_flow(self, question: str, k: int | None) -> Flow[list[str]]:
        if self.retriever is None and self.aretriever is None:
            _log.warning("guard.retrieve.no_retriever", question=question[:200])
            return []
        docs = yield Call(
            functools.partial(self._call_retriever, question),
            functools.partial(self._acall_retriever, question),
        )
        return _retrieved(docs, k)

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

    def retrieve(self, question: str, k: int | None = None) -> list[str]:
        """Call the retriever (no check); ``[]`` and a warning when there is none."""
        return drive(self._retrieve_flow(question, k))

    async def aretrieve(self, question: str, k: int | None = None) -> list[str]:
        """Async :meth:`retrieve` (a sync retriever runs in a worker thread)."""
        return await adrive(self._retrieve_flow(question, k))

    # ------------------------------------------------------------------ run
    def _abstained(
        self, res: GuardResult, decision: Decision | None, message: str | None = None
    ) -> GuardResult:
        res.abstained = True
        res.answer = None
        res.raw = None
        res.output = message or (decision.message if decision else None) or self.abstain_message
        return res

    @staticmethod
    def _check_call(
        prompt: Any, documents: Any, tags: Any, run_name: Any
    ) -> tuple[str, list[str] | None]:
        _check_meta(tags, run_name)
        docs = None if documents is None else _check_texts("documents", documents)
        return _check_text("prompt", prompt), docs

    def _prepare_flow(
        self,
        prompt: str,
        *,
        documents: Sequence[str] | None,
        source: Literal["retrieval", "tool", "cache"],
        check_prompt: bool,
        tags: Sequence[str],
        run_name: str | None,
        run_id: str | None,
        parent_run_id: str | None,
        stats: CallStats | None,
    ) -> Flow[GuardResult]:
        """The pre-generation steps: check the documents, the prompt, retrieve, check the
        retrieved documents and the prompt again (see :meth:`prepare`)."""
        prompt, documents = self._check_call(prompt, documents, tags, run_name)
        with self.bind(run_id, parent_run_id) as rid:
            res = self._new_result(prompt, rid, stats)
            kw: dict[str, Any] = {"tags": tags, "run_name": run_name, "stats": res.stats}
            ctx = RetrievedContext()
            if documents:
                ctx.extend((yield from self._screen_flow(prompt, documents, source=source, **kw)))
                if ctx.abstain:
                    return self._finish(res, ctx, abstain=ctx.abstain)
            final_prompt = format_context(prompt, ctx.documents, self.context_template)
            if not check_prompt:
                return self._finish(res, ctx, final_prompt=final_prompt)
            (d,) = yield from self._check_flow(
                "prompt", prompt, [None], extra=_context_field(ctx.documents), **kw
            )
            ctx.decisions.append(d)
            res.entropy = d.scores.get("entropy")
            if d.action == "retrieve":
                docs = yield from self._retrieve_flow(prompt, d.params.get("k"))
                if docs:
                    ctx.extend((yield from self._screen_flow(prompt, docs, **kw)))
                    if ctx.abstain:
                        return self._finish(res, ctx, abstain=ctx.abstain)
                    if ctx.documents:
                        final_prompt = format_context(prompt, ctx.documents, self.context_template)
                        (d,) = yield from self._check_flow(
                            "prompt", prompt, [None], **self._after_retrieval(res, ctx), **kw
                        )
                        ctx.decisions.append(d)
            return self._finish(
                res, ctx, final_prompt=final_prompt, abstain=d if d.action == "abstain" else None
            )

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
        return drive(
            self._prepare_flow(
                prompt,
                documents=documents,
                source=source,
                check_prompt=check_prompt,
                tags=tags,
                run_name=run_name,
                run_id=run_id,
                parent_run_id=parent_run_id,
                stats=stats,
            )
        )

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
        return await adrive(
            self._prepare_flow(
                prompt,
                documents=documents,
                source=source,
                check_prompt=check_prompt,
                tags=tags,
                run_name=run_name,
                run_id=run_id,
                parent_run_id=parent_run_id,
                stats=stats,
            )
        )

    @staticmethod
    def _after_retrieval(res: GuardResult, ctx: RetrievedContext) -> dict[str, Any]:
        """How the prompt decision is made again once documents were retrieved: on the
        question's entropy (what the student was trained on; no new pass), with the
        ``retrieve`` rules left out (retrieval is done)."""
        return {
            "entropy": res.entropy,
            "skip_actions": ("retrieve",),
            "extra": {"after_retrieval": True, **_context_field(ctx.documents)},
        }

    # ------------------------------------------------------------------ regeneration
    def _regen_mode(self, generate: Callable[..., Any], deterministic: bool | None) -> RegenMode:
        """How ``reject_answer`` regenerates with *generate* (see the module doc): an
        explicit *deterministic* wins, then a ``can_sample = False`` attribute (a model
        that cannot be switched to sampling), then a ``temperature=`` keyword, then a
        ``deterministic`` attribute on *generate*."""
        if deterministic is True:
            return "skip"
        if getattr(generate, "can_sample", None) is False:
            return "fixed"
        if self.regen_temperature > 0 and _accepts_temperature(generate):
            return "sample"
        if deterministic is None:
            deterministic = getattr(generate, "deterministic", None)
        if deterministic is True:
            return "skip"
        return "own" if deterministic is False else "repeat"

    def _generate_kwargs(self, mode: RegenMode, attempt: int) -> dict[str, Any]:
        if attempt > 0 and mode == "sample":
            return {"temperature": self.regen_temperature}
        return {}

    def _regeneration(
        self, d: Decision, mode: RegenMode, attempt: int, repeated: bool
    ) -> dict[str, Any]:
        """The ``regeneration`` fields of a ``reject_answer`` event: what happens next."""
        if attempt >= int(d.params.get("max_regenerations", 1)):
            return {"regeneration": "exhausted"}
        if mode == "skip":
            return {"regeneration": "skipped-deterministic"}
        if mode == "fixed":
            return {"regeneration": "skipped-no-sampling"}
        if mode == "repeat" and repeated:
            return {"regeneration": "stopped-identical"}
        if mode == "sample":
            return {"regeneration": "sample", "regen_temperature": self.regen_temperature}
        return {"regeneration": "same-settings"}

    def _answer_step(
        self, res: GuardResult, raw: Any, extract: Callable[[Any], str | None] | None
    ) -> str | None:
        res.generations += 1
        text = extract(raw) if extract is not None else raw
        if text is None:
            res.output, res.answer, res.raw = "", None, raw
            return None
        return str(text)

    def _on_reject(
        self, res: GuardResult, mode: RegenMode, attempt: int, text: str
    ) -> Callable[[Decision], tuple[Decision, Mapping[str, Any]]]:
        repeated = text in res.rejected

        def fields(d: Decision) -> tuple[Decision, Mapping[str, Any]]:
            out = self._regeneration(d, mode, attempt, repeated)
            res.regeneration = out["regeneration"]
            if out["regeneration"] not in _REGENERATING:
                # Nothing more is tried: the rule's outcome is the abstention, and the
                # event says so (``rule`` and ``regeneration`` say why).
                d = dataclasses.replace(d, action="abstain")
            return d, out

        return fields

    def _complete_flow(
        self,
        res: GuardResult,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None,
        tags: Sequence[str],
        run_name: str | None,
        deterministic: bool | None,
    ) -> Flow[GuardResult]:
        """The generation steps: generate, check the answer, regenerate or accept / abstain
        (see :meth:`complete`). The async driver awaits what *generate* returns when it is
        awaitable."""
        if res.abstained:
            return res
        _check_meta(tags, run_name)
        mode = self._regen_mode(generate, deterministic)
        stats = self._stats_of(res)
        with self.bind(res.run_id, res.parent_run_id):
            attempt = 0
            while True:
                kw = self._generate_kwargs(mode, attempt)
                raw = yield Call(functools.partial(generate, res.final_prompt, **kw))
                text = self._answer_step(res, raw, extract)
                if text is None:  # a tool call / structured output: no text to check
                    _log.info(
                        "guard.answer.unchecked",
                        run_id=res.run_id,
                        reason="no text answer (tool call or structured output)",
                        output_type=type(raw).__name__,
                    )
                    return res
                (d,) = yield from self._check_flow(
                    "answer",
                    res.prompt,  # the question: the student never saw the context prompt
                    [text],
                    entropy=res.entropy,
                    tags=tags,
                    run_name=run_name,
                    on_reject=self._on_reject(res, mode, attempt, text),
                    stats=stats,
                    # a regeneration's event says which one it is (never a copy of the
                    # draft's event, even when the model repeated the draft)
                    extra={
                        **_context_field(res.documents),
                        **({"attempt": attempt} if attempt else {}),
                    },
                )
                res.decisions.append(d)
                if self._verdict(res, d, text, raw):
                    return res
                attempt += 1

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
        return drive(
            self._complete_flow(
                res,
                generate,
                extract=extract,
                tags=tags,
                run_name=run_name,
                deterministic=deterministic,
            )
        )

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
        return await adrive(
            self._complete_flow(
                res,
                generate,
                extract=extract,
                tags=tags,
                run_name=run_name,
                deterministic=deterministic,
            )
        )

    def _run_flow(
        self,
        prompt: str,
        generate: Callable[..., Any],
        *,
        extract: Callable[[Any], str | None] | None,
        documents: Sequence[str] | None,
        source: Literal["retrieval", "tool", "cache"],
        check_prompt: bool,
        tags: Sequence[str],
        run_name: str | None,
        run_id: str | None,
        parent_run_id: str | None,
        deterministic: bool | None,
        stats: CallStats | None,
    ) -> Flow[GuardResult]:
        """The whole guarded call: :meth:`_prepare_flow`, then :meth:`_complete_flow`."""
        with self.bind(run_id, parent_run_id) as rid:
            res = yield from self._prepare_flow(
                prompt,
                documents=documents,
                source=source,
                check_prompt=check_prompt,
                tags=tags,
                run_name=run_name,
                run_id=rid,
                parent_run_id=None,
                stats=stats,
            )
            return (
                yield from self._complete_flow(
                    res,
                    generate,
                    extract=extract,
                    tags=tags,
                    run_name=run_name,
                    deterministic=deterministic,
                )
            )

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
        return drive(
            self._run_flow(
                prompt,
                generate,
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
        )

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
        return await adrive(
            self._run_flow(
                prompt,
                generate,
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
        )

    def _new_result(self, prompt: str, run_id: str, stats: CallStats | None) -> GuardResult:
        parent = structlog.contextvars.get_contextvars().get("parent_run_id")
        return GuardResult(
            output="",
            abstained=False,
            prompt=prompt,
            final_prompt=prompt,
            run_id=run_id,
            parent_run_id=None if parent is None else str(parent),
            stats=stats if stats is not None else CallStats(),
        )

    @staticmethod
    def _stats_of(res: GuardResult) -> CallStats:
        if res.stats is None:  # a result made by hand (e.g. from a stored agent turn)
            res.stats = CallStats()
        return res.stats

    def _finish(
        self,
        res: GuardResult,
        ctx: RetrievedContext,
        *,
        abstain: Decision | None = None,
        final_prompt: str | None = None,
    ) -> GuardResult:
        res.decisions = list(ctx.decisions)
        res.documents = list(ctx.documents)
        res.quarantined = list(ctx.quarantined)
        res.dropped = len(ctx.dropped)
        if final_prompt is not None:
            res.final_prompt = final_prompt
        if abstain is not None:
            return self._abstained(res, abstain)
        return res

    def _verdict(self, res: GuardResult, d: Decision, text: str, raw: Any) -> bool:
        """After an answer check: accept or abstain (``True``: done), or regenerate."""
        if d.action == "abstain":
            res.rejected.append(text)
            self._abstained(res, d)
            return True
        if d.action == "reject_answer":
            res.rejected.append(text)
            if res.regeneration in _REGENERATING:
                return False
            self._abstained(res, d)
            return True
        res.output, res.answer, res.raw = text, text, raw
        return True


def _context_field(documents: Sequence[str]) -> dict[str, Any]:
    """``context_documents``: how many documents the model's prompt holds (audit)."""
    return {"context_documents": len(documents)} if documents else {}


def _first_row(out: Sequence[Any]) -> list[float]:
    row = out[0]
    return [float(v) for v in (row if isinstance(row, Sequence) else [row])]


def _split(
    docs: Sequence[str], decisions: Sequence[Decision]
) -> tuple[list[str], list[str], list[Decision]]:
    kept: list[str] = []
    flagged: list[str] = []
    for doc, d in zip(docs, decisions, strict=True):
        (flagged if d.action in ("flag_poisoned", "abstain") else kept).append(doc)
    return kept, flagged, list(decisions)
