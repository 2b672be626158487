"""The schema of the guard's score-cache entries: what a cached value must be to be used
(anything else is a logged miss, scored again).

A prompt entry is ``{"entropy": x}`` or ``{"entropy": x, "risk": y}``; an answer /
document entry is ``{"loglik": x}`` plus optional answer, pair-scorer and screening
signals. Every value is a finite number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import structlog

from ssd_guard.policy.schema import ANSWER_SIGNALS, DOCUMENT_SIGNALS, PAIR_SIGNALS

__all__ = ["cached_answer_scores", "cached_prompt_scores", "cached_score"]

_log = structlog.get_logger("ssd_guard.guard")


def cached_score(hit: Mapping[str, Any] | None, name: str, key: str) -> float | None:
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


def cached_prompt_scores(hit: Mapping[str, Any] | None, key: str) -> dict[str, float] | None:
    """A prompt entry: ``{"entropy": x}`` or ``{"entropy": x, "risk": y}``, finite
    numbers; anything else is a logged miss."""
    if isinstance(hit, Mapping) and set(hit) == {"entropy", "risk"}:
        risk = cached_score({"risk": hit["risk"]}, "risk", key)
        entropy = cached_score({"entropy": hit["entropy"]}, "entropy", key)
        if risk is None or entropy is None:
            return None
        return {"entropy": entropy, "risk": risk}
    entropy = cached_score(hit, "entropy", key)
    return None if entropy is None else {"entropy": entropy}


def cached_answer_scores(hit: Mapping[str, Any] | None, key: str) -> dict[str, float] | None:
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
