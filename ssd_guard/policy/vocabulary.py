"""The policy vocabulary: scopes, actions, sources, the signals a condition can test, and
which of them apply where."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Scope = Literal["prompt", "answer", "document"]
ActionName = Literal["allow", "abstain", "retrieve", "reject_answer", "flag_poisoned", "log_only"]
Source = Literal["retrieval", "tool", "cache"]
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

#: The scores a condition can test. ``entropy``: pre-generation risk of the prompt (higher is
#: riskier). The answer signals (lower is more suspicious for each): ``loglik``:
#: log-likelihood of an answer / document under the prompt's predicted answer distribution;
#: ``pmi``: that minus its log-density under the student's *unconditional* answer
#: distribution (pointwise mutual information: an answer that is likely for *any* question
#: no longer passes); ``consensus``: minus the distance of the answer to the predicted
#: mixture mean (the semantic consensus of the answers the model would give).
#: ``risk`` (higher is riskier): the student's combined probability that the default
#: answer is wrong (:mod:`ssd_guard.scoring.risk`; its pre-generation variant on scope
#: ``prompt``, with the answer's signals on scope ``answer``). ``semgrad``, ``hybridgrad``
#: (gradient uncertainty, :mod:`ssd_guard.scoring.semgrad`) and ``draft_eu`` (draft-model
#: epistemic uncertainty, :mod:`ssd_guard.scoring.draft_eu`): post-generation scorers the
#: guard runs beside the student (``Guard(pair_scorers=...)``), higher is riskier.
#: Document screening (:mod:`ssd_guard.screening`, scope ``document`` only): ``relevance``
#: (cosine similarity of the question and the document, lower is more suspicious: the
#: document belongs to another question or to none) and ``instruction`` (in ``[0, 1]``,
#: higher is riskier: the text reads as an instruction to the model, a prompt injection).
METRICS: tuple[str, ...] = (
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
)

#: The answer-side signals one scorer pass gives.
ANSWER_SIGNALS: tuple[str, ...] = ("loglik", "pmi", "consensus")

#: Answer-scope signals of the post-generation scorers that run beside the student.
PAIR_SIGNALS: tuple[str, ...] = ("semgrad", "hybridgrad", "draft_eu")

#: Document-scope screening signals (:class:`ssd_guard.screening.DocumentScreener`).
DOCUMENT_SIGNALS: tuple[str, ...] = ("relevance", "instruction")

#: Signals the student's calibration set holds no values of: only raw bounds (``gt``,
#: ``lt``...) apply to them, quantile and ``calibrated`` bounds are refused at load.
UNCALIBRATED_SIGNALS: frozenset[str] = frozenset(DOCUMENT_SIGNALS)

#: Signals for which a higher value is riskier (the others: lower is more suspicious).
HIGHER_IS_RISKIER: frozenset[str] = frozenset({"entropy", "risk", *PAIR_SIGNALS, "instruction"})

#: Which scores exist at each scope.
SCOPE_METRICS: Mapping[str, frozenset[str]] = {
    "prompt": frozenset({"entropy", "risk"}),
    "answer": frozenset({"entropy", "risk", *ANSWER_SIGNALS, *PAIR_SIGNALS}),
    "document": frozenset({"entropy", *ANSWER_SIGNALS, *DOCUMENT_SIGNALS}),
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
