"""Which signals a policy reads, at which scope, and whether the guard's scorers provide
them (a policy reading a signal no scorer provides is refused when the guard is made)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ssd_guard.errors import ConfigError
from ssd_guard.policy import Policy
from ssd_guard.policy.schema import DOCUMENT_SIGNALS, PAIR_SIGNALS
from ssd_guard.scoring.base import RiskScorer
from ssd_guard.signals import signal

__all__ = ["SignalNeeds", "check_provided", "unprovided"]


@dataclass(frozen=True)
class SignalNeeds:
    """The signals the rules of a policy read, beyond what every check computes."""

    entropy_scopes: frozenset[str]
    """The scopes with a rule that reads the prompt's ``entropy``."""
    prompt_risk: bool
    """A prompt rule reads ``risk`` (the combined risk's ``pre`` variant)."""
    answer: frozenset[str]
    """Answer signals beyond the SSD ones (``risk``, the pair scorers')."""
    document: frozenset[str]
    """Document screening signals (``relevance``, ``instruction``)."""

    @classmethod
    def of(cls, policy: Policy) -> SignalNeeds:
        used = {
            (rule.scope, m)
            for rule in policy.rules
            if rule.when is not None
            for m in rule.when.metrics()
        }
        return cls(
            entropy_scopes=frozenset(
                rule.scope
                for rule in policy.rules
                if rule.when is not None and "entropy" in rule.when.metrics()
            ),
            prompt_risk=("prompt", "risk") in used,
            answer=frozenset(
                m for scope, m in used if scope == "answer" and m in ("risk", *PAIR_SIGNALS)
            ),
            document=frozenset(
                m for scope, m in used if scope == "document" and m in DOCUMENT_SIGNALS
            ),
        )


def unprovided(
    scorer: RiskScorer, pair_scorers: Mapping[str, Any], scope: str, metric: str
) -> str | None:
    """Why no scorer of a guard provides *metric* at *scope*, or ``None``, by what the
    signal registry (:mod:`ssd_guard.signals`) says provides it: ``scorer`` signals
    (entropy, loglik) are every scorer's; ``answer_signals`` ones (pmi, consensus) need
    that method; ``risk_model`` (risk) a risk model and ``prompt_signals`` (scope prompt) /
    ``answer_signals``; ``pair`` signals their pair scorer; the ``screener`` is built on
    demand."""
    kind = type(getattr(scorer, "scorer", scorer)).__name__
    provider = signal(metric).provider
    if provider == "answer_signals":
        if not callable(getattr(scorer, "answer_signals", None)):
            return (
                f"the scorer ({kind}) has no answer_signals method, which computes "
                "pmi and consensus: use a scorer that has one (SSDScorer, the SSD "
                "student, does), or read loglik instead"
            )
    elif provider == "risk_model":
        if getattr(scorer, "risk_model", None) is None:
            return (
                f"the student ({kind}) has no risk model (risk.safetensors in its "
                "artifact): run `ssd-guard fit-risk`"
            )
        method = "prompt_signals" if scope == "prompt" else "answer_signals"
        if not callable(getattr(scorer, method, None)):
            return (
                f"the scorer ({kind}) has no {method} method, which computes {metric} on "
                f"scope {scope}: use a scorer that has one (SSDScorer with a risk model)"
            )
    elif provider == "pair" and metric not in pair_scorers:
        name = {"draft_eu": "DraftEUScorer"}.get(metric, "SemGradScorer / HybridGradScorer")
        return (
            f"no scorer for it was given: pass Guard(pair_scorers=[...]) with a scorer "
            f"whose signal is {metric!r} ({name} in ssd_guard.scoring)"
        )
    return None


def check_provided(policy: Policy, scorer: RiskScorer, pair_scorers: Mapping[str, Any]) -> None:
    """Refuse *policy* when one of its rules reads a signal no scorer provides (the rule
    would stay silent, every decision logging it in ``missing_scores``), naming who would
    provide it."""
    for index, rule in enumerate(policy.rules):
        for metric in sorted(rule.when.metrics() if rule.when is not None else ()):
            lacking = unprovided(scorer, pair_scorers, rule.scope, metric)
            if lacking is not None:
                raise ConfigError(
                    f"{policy.source}: rules[{index}] '{rule.name}' (scope "
                    f"{rule.scope}) reads '{metric}', but {lacking}"
                )
