"""The guard's parts and configuration: what :class:`~ssd_guard.guard.Guard` is made of
(scorer, policy, cache, retrievers, screener...), what it derives from them when made,
and its views for a guarded model (:meth:`GuardBase.for_model`)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ssd_guard.cache import ScoreCache, cache_from_config
from ssd_guard.errors import ConfigError
from ssd_guard.guard.context import DEFAULT_CONTEXT_TEMPLATE
from ssd_guard.guard.needs import SignalNeeds, check_provided
from ssd_guard.guard.runs import StepCounter
from ssd_guard.policy import Policy, check_policy_references, load_policy
from ssd_guard.provenance import model_name, resolve_hidden_state_source, validate_source
from ssd_guard.scoring.base import PairScorer, RiskScorer

if TYPE_CHECKING:
    from ssd_guard.screening import DocumentScreener

__all__ = ["REGEN_TEMPERATURE", "AsyncRetriever", "GuardBase", "Retriever"]

#: Temperature of a regeneration after ``reject_answer`` when ``generate`` accepts a
#: ``temperature=`` keyword: the teacher's sampling temperature (the SSD signals describe
#: the model's sampled answers), so a rejected greedy answer is not simply repeated.
REGEN_TEMPERATURE = 1.0

Retriever = Callable[[str], Sequence[str]]
AsyncRetriever = Callable[[str], Awaitable[Sequence[str]]]


class GuardBase:
    """What a :class:`~ssd_guard.guard.Guard` is made of (its parameters are documented
    there): the parts it was given, what it derives from the policy, and its views."""

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
        self._steps = StepCounter()
        self.pair_scorers: dict[str, PairScorer] = {}
        for ps in pair_scorers:
            if not isinstance(ps, PairScorer):
                raise ConfigError(f"pair_scorers: {ps!r} is not a PairScorer (score_pairs)")
            self.pair_scorers[str(ps.signal)] = ps
        self._needs = SignalNeeds.of(self.policy)
        if screener is not None and not callable(getattr(screener, "score", None)):
            raise ConfigError(f"screener: {screener!r} is not a DocumentScreener (score)")
        self._screener: DocumentScreener | None = screener
        self._screener_lock = threading.Lock()
        # A signal no scorer provides would leave its rule silent (every decision logging
        # it in missing_scores): refuse the policy now, naming who would provide it.
        check_provided(self.policy, self.scorer, self.pair_scorers)

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
        return "risk" in self._needs.answer

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

    # ------------------------------------------------------------------ views
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
    ) -> Self:
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

    def with_hidden_state_source(self, label: str, *, guarded_model: str | None = None) -> Self:
        """A view of this guard recording *label* as ``hidden_state_source`` (unless the
        guarded model it knows is the scorer's base model: see :meth:`for_model`)."""
        return self.for_model(source=label, name=guarded_model, integration=False)

    def __repr__(self) -> str:
        return (
            f"Guard(scorer={getattr(self.scorer, 'name', type(self.scorer).__name__)!r}, "
            f"policy={self.policy.name!r}, cache={self.cache!r}, "
            f"hidden_state_source={self.hidden_state_source!r})"
        )
