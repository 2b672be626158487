"""Rule evaluation: the :class:`Decision` a policy returns, and the quantile and condition
helpers :meth:`~ssd_guard.policy.Policy.decide` uses."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ssd_guard.policy.reporting import format_path
from ssd_guard.policy.vocabulary import BLOCKING_ACTIONS, METRICS, ActionName, Scope

if TYPE_CHECKING:
    from ssd_guard.policy.rules import Condition, Threshold


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one call at one scope."""

    action: ActionName
    rule: str | None
    """The matching rule's name; ``None`` when ``default_action`` applied."""
    scope: Scope
    scores: dict[str, float]
    """The scores the decision was made on (missing / NaN ones are left out)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Resolved raw bounds of the matching rule, e.g. ``{"entropy.gt": 2.31}``; bounds inside
    ``all`` / ``any`` are prefixed with their path (``any[1].loglik.lt``)."""
    params: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    missing_scores: tuple[str, ...] = ()
    """Scores some evaluated rule needed but that were missing or NaN."""
    policy_name: str | None = None

    @property
    def blocking(self) -> bool:
        """True for abstain / reject_answer: the call's output must not go through as is."""
        return self.action in BLOCKING_ACTIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rule": self.rule,
            "scope": self.scope,
            "scores": dict(self.scores),
            "thresholds": dict(self.thresholds),
            "params": dict(self.params),
            "message": self.message,
            "missing_scores": list(self.missing_scores),
            "policy_name": self.policy_name,
            "blocking": self.blocking,
        }


_SORTED_CACHE: dict[int, tuple[Sequence[float], int, tuple[float, ...]]] = {}
_SORTED_CACHE_MAX = 32
_SORTED_LOCK = threading.Lock()


def _sorted_finite(values: Sequence[float] | None) -> tuple[float, ...]:
    """Finite values sorted ascending; memoised per sequence object (kept alive while cached)."""
    if values is None:
        return ()
    hit = _SORTED_CACHE.get(id(values))
    if hit is not None and hit[0] is values and hit[1] == len(values):
        return hit[2]
    result = tuple(sorted(float(v) for v in values if v is not None and math.isfinite(float(v))))
    with _SORTED_LOCK:
        while len(_SORTED_CACHE) >= _SORTED_CACHE_MAX:
            _SORTED_CACHE.pop(next(iter(_SORTED_CACHE)))
        _SORTED_CACHE[id(values)] = (values, len(values), result)
    return result


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of ascending values."""
    n = len(sorted_values)
    if n == 1:
        return float(sorted_values[0])
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _compare(value: float, op: str, bound: float) -> bool:
    if op == "gt":
        return value > bound
    if op == "ge":
        return value >= bound
    if op == "lt":
        return value < bound
    return value <= bound


def _evaluate(
    cond: Condition,
    path: tuple[str | int, ...],
    values: Mapping[str, float],
    calibration: Mapping[str, Sequence[float]] | None,
    thresholds: dict[str, float],
    missing: set[str],
) -> bool:
    """Evaluate without short-circuit so thresholds and missing scores are complete."""
    ok = True
    prefix = format_path(path)
    prefix = f"{prefix}." if prefix else ""
    for metric in METRICS:
        threshold: Threshold | None = getattr(cond, metric)
        if threshold is None:
            continue
        value = values.get(metric)
        if value is None:
            missing.add(metric)
        for op, is_q, v in threshold.bounds():
            if is_q:
                assert calibration is not None  # checked by Policy.check_calibration
                bound = _quantile(_sorted_finite(calibration[metric]), v)
            else:
                bound = v
            thresholds[f"{prefix}{metric}.{op}"] = bound
            if value is None or not _compare(value, op, bound):
                ok = False
    if cond.all_:
        results = [
            _evaluate(sub, (*path, "all", i), values, calibration, thresholds, missing)
            for i, sub in enumerate(cond.all_)
        ]
        ok = ok and all(results)
    if cond.any_:
        results = [
            _evaluate(sub, (*path, "any", i), values, calibration, thresholds, missing)
            for i, sub in enumerate(cond.any_)
        ]
        ok = ok and any(results)
    return ok
