"""The policy vocabulary: scopes, actions, sources, the signals a condition can test, and
which of them apply where."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ssd_guard.signals import SIGNALS, by_provider, signals_at

Scope = Literal["prompt", "answer", "document"]
ActionName = Literal["allow", "abstain", "retrieve", "reject_answer", "flag_poisoned", "log_only"]
Source = Literal["retrieval", "tool", "cache"]
#: The signals a condition can test, as a type; the same names, in the same order, as the
#: signal registry (:data:`ssd_guard.signals.SIGNALS`, which says what each one is, where
#: it exists, which way is risky and what computes it; a test pins the two together).
Metric = Literal[
    "entropy",
    "risk",
    "loglik",
    "pmi",
    "consensus",
    "semgrad",
    "hybridgrad",
    "draft_eu",
    "relevance",
    "instruction",
]

#: The scores a condition can test (the registry's names).
METRICS: tuple[str, ...] = tuple(SIGNALS)

#: The answer-side signals one scorer pass gives (the SSD student's).
ANSWER_SIGNALS: tuple[str, ...] = ("loglik", *by_provider("answer_signals"))

#: Answer-scope signals of the post-generation scorers that run beside the student.
PAIR_SIGNALS: tuple[str, ...] = by_provider("pair")

#: Document-scope screening signals (:class:`ssd_guard.screening.DocumentScreener`).
DOCUMENT_SIGNALS: tuple[str, ...] = by_provider("screener")

#: Signals the student's calibration set holds no values of: only raw bounds (``gt``,
#: ``lt``...) apply to them, quantile and ``calibrated`` bounds are refused at load.
UNCALIBRATED_SIGNALS: frozenset[str] = frozenset(n for n, s in SIGNALS.items() if not s.calibrated)

#: Signals for which a higher value is riskier (the others: lower is more suspicious).
HIGHER_IS_RISKIER: frozenset[str] = frozenset(n for n, s in SIGNALS.items() if s.higher_is_riskier)

#: Which scores exist at each scope.
SCOPE_METRICS: Mapping[str, frozenset[str]] = {
    scope: signals_at(scope) for scope in ("prompt", "answer", "document")
}

#: Which actions make sense at each scope.
SCOPE_ACTIONS: Mapping[str, frozenset[str]] = {
    "prompt": frozenset({"allow", "abstain", "retrieve", "log_only"}),
    "answer": frozenset({"allow", "abstain", "reject_answer", "log_only"}),
    "document": frozenset({"allow", "abstain", "flag_poisoned", "log_only"}),
}

#: Actions that stop the call from going through as is.
BLOCKING_ACTIONS: frozenset[str] = frozenset({"abstain", "reject_answer"})

#: Actions allowed as ``default_action`` (it applies to every scope).
DEFAULT_ACTIONS: frozenset[str] = frozenset({"allow", "log_only", "abstain"})

#: The parameter each action takes, with its default.
ACTION_PARAMS: Mapping[str, Mapping[str, Any]] = {
    "reject_answer": {"max_regenerations": 1},
    "flag_poisoned": {"mode": "drop"},
    "retrieve": {"k": 4},
}

SUPPORTED_VERSIONS = (1,)

#: Longest cache ``ttl_s`` accepted: ten years, in seconds. Redis refuses an expiry whose
#: milliseconds overflow a 64-bit integer, so a bound is needed, and no score should outlive
#: the student that produced it by more than that.
MAX_TTL_S = 10 * 365 * 24 * 3600

_BOUNDS = ("gt", "ge", "lt", "le")
