"""The signal registry: every score a policy rule can read, declared once.

Each :class:`Signal` says where it exists (its scopes), which way is risky, whether the
student's calibration set holds values of it (so quantile / ``calibrated`` bounds apply),
whether ``ssd-guard calibrate`` can fit a Learn-then-Test threshold on it, and what
provides it. The policy vocabulary (:mod:`ssd_guard.policy.vocabulary`), the calibration
file (:mod:`ssd_guard.calibration`), the guard's construction check and the CLI read this
table; adding a signal is one entry here plus the scorer that computes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "SIGNALS",
    "Provider",
    "Signal",
    "by_provider",
    "higher_is_riskier",
    "signal",
    "signals_at",
]

#: What computes a signal:
#: ``scorer`` — any :class:`~ssd_guard.scoring.base.RiskScorer` (``score_prompts`` /
#: ``score_answers``); ``answer_signals`` — a scorer with ``answer_signals`` (the SSD
#: student: one pass gives every answer signal); ``risk_model`` — a student with a fitted
#: combined risk (``ssd-guard fit-risk``); ``pair`` — a post-generation scorer given to
#: the guard (``Guard(pair_scorers=[...])``); ``screener`` — the document screener
#: (:mod:`ssd_guard.screening`, built on demand).
Provider = Literal["scorer", "answer_signals", "risk_model", "pair", "screener"]
Scope = Literal["prompt", "answer", "document"]


@dataclass(frozen=True)
class Signal:
    """One score a rule can test."""

    name: str
    scopes: frozenset[Scope]
    higher_is_riskier: bool
    provider: Provider
    doc: str
    #: the student's calibration file holds values of it (quantile bounds apply)
    calibrated: bool = True
    #: ``ssd-guard calibrate`` can fit a Learn-then-Test threshold on it
    calibratable: bool = False
    #: the variants a scorer computes (the combined risk: before generation, with the
    #: answer's signals, with the generation's own token statistics)
    variants: tuple[str, ...] = ()


_ALL: frozenset[Scope] = frozenset({"prompt", "answer", "document"})
_POST: frozenset[Scope] = frozenset({"answer", "document"})

SIGNALS: Mapping[str, Signal] = {
    s.name: s
    for s in (
        Signal(
            "entropy",
            _ALL,
            True,
            "scorer",
            "Rényi-2 entropy of the student's predicted answer mixture: pre-generation risk",
            calibratable=True,
        ),
        Signal(
            "risk",
            frozenset({"prompt", "answer"}),
            True,
            "risk_model",
            "the combined probability that the default answer is wrong",
            calibratable=True,
            variants=("pre", "post", "post_gen"),
        ),
        Signal(
            "loglik",
            _POST,
            False,
            "scorer",
            "log-likelihood of an answer / document embedding under the predicted mixture",
            calibratable=True,
        ),
        Signal(
            "pmi",
            _POST,
            False,
            "answer_signals",
            "loglik minus the answer's log-density under the unconditional answer distribution",
            calibratable=True,
        ),
        Signal(
            "consensus",
            _POST,
            False,
            "answer_signals",
            "minus the distance of the answer to the predicted mixture mean",
        ),
        Signal(
            "semgrad",
            frozenset({"answer"}),
            True,
            "pair",
            "semantic gradient uncertainty (SemGrad)",
        ),
        Signal(
            "hybridgrad",
            frozenset({"answer"}),
            True,
            "pair",
            "SemGrad combined with the token gradient (HybridGrad)",
        ),
        Signal(
            "draft_eu",
            frozenset({"answer"}),
            True,
            "pair",
            "draft-model epistemic uncertainty (DraftEU)",
        ),
        Signal(
            "relevance",
            frozenset({"document"}),
            False,
            "screener",
            "cosine similarity of the question and the document",
            calibrated=False,
        ),
        Signal(
            "instruction",
            frozenset({"document"}),
            True,
            "screener",
            "how much the text reads as an instruction to the model (prompt injection)",
            calibrated=False,
        ),
    )
}


def signal(name: str) -> Signal:
    """The registered signal *name*; ``KeyError`` naming the known ones otherwise."""
    try:
        return SIGNALS[name]
    except KeyError:
        raise KeyError(f"unknown signal {name!r}; known: {sorted(SIGNALS)}") from None


def signals_at(scope: str) -> frozenset[str]:
    """The signals that exist at *scope*."""
    return frozenset(n for n, s in SIGNALS.items() if scope in s.scopes)


def by_provider(provider: Provider) -> tuple[str, ...]:
    """The signals *provider* computes, in registry order."""
    return tuple(n for n, s in SIGNALS.items() if s.provider == provider)


def higher_is_riskier(name: str) -> bool:
    """Whether a higher value of *name* is riskier (else lower is more suspicious)."""
    return signal(name).higher_is_riskier
