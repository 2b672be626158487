"""A policy in plain words: :func:`describe_policy` (what ``ssd-guard check-policy`` prints)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ssd_guard.policy.evaluation import _quantile, _sorted_finite
from ssd_guard.policy.schema import (
    HIGHER_IS_RISKIER,
    METRICS,
    Condition,
    Policy,
    Threshold,
)

__all__ = ["describe_policy"]

_OP_SYMBOL = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_SCOPE_WORDS = {
    "prompt": "before generation",
    "answer": "after generation",
    "document": "on retrieved documents / tool outputs / cache hits",
}


def _ordinal(x: float) -> str:
    text = f"{x:g}"
    if "." in text or "e" in text:
        return f"{text}th"
    n = int(text)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _describe_bound(
    metric: str, op: str, is_q: bool, v: float, calibration: Mapping[str, Sequence[float]] | None
) -> str:
    sym = _OP_SYMBOL[op]
    if not is_q:
        return f"{metric} {sym} {v:g}"
    pct = v * 100
    if op in ("gt", "ge"):
        share = f"the top {100 - pct:g} %"
        if metric in HIGHER_IS_RISKIER:
            share = f"the riskiest {100 - pct:g} %"
    else:
        share = f"the bottom {pct:g} %"
        if metric in ("loglik", "pmi", "consensus"):
            share = f"the least likely {pct:g} %"
    text = f"{metric} {sym} its {_ordinal(pct)} percentile on the calibration set ({share}"
    values = None if calibration is None else calibration.get(metric)
    sorted_values = _sorted_finite(values)
    if sorted_values:
        text += f"; = {_quantile(sorted_values, v):.4g}"
    return text + ")"


def _describe_condition(
    cond: Condition,
    calibration: Mapping[str, Sequence[float]] | None,
    guarantees: list[str] | None = None,
) -> str:
    """*cond* in words; a calibrated bound's guarantee text is added to *guarantees* (once:
    rules resolved from one calibration file share it) and referred to as ``[n]``."""
    if guarantees is None:
        guarantees = []
    parts: list[str] = []
    for metric in METRICS:
        threshold: Threshold | None = getattr(cond, metric)
        if threshold is not None:
            if threshold.unresolved_calibration:
                want = threshold.calibrated
                assert want is not None
                parts.append(
                    f"{metric} outside its calibrated bound (max error {want.max_error:g}, "
                    f"confidence {want.confidence:g}; not resolved: no calibration file read)"
                )
                continue
            parts.extend(
                _describe_bound(metric, op, q, v, calibration) for op, q, v in threshold.bounds()
            )
            if threshold.guarantee:
                if threshold.guarantee not in guarantees:
                    guarantees.append(threshold.guarantee)
                parts[-1] += f" [calibrated guarantee {guarantees.index(threshold.guarantee) + 1}]"
    if cond.all_:
        subs = [_describe_condition(c, calibration, guarantees) for c in cond.all_]
        parts.append("all of (" + "; ".join(subs) + ")")
    if cond.any_:
        subs = [_describe_condition(c, calibration, guarantees) for c in cond.any_]
        parts.append("any of (" + "; ".join(subs) + ")")
    return " and ".join(parts)


def _describe_action(action: str, params: Mapping[str, Any], message: str | None) -> str:
    if action == "allow":
        return "allow the call"
    if action == "log_only":
        return "let the call through and log it (shadow mode)"
    if action == "abstain":
        return f'abstain with message "{message}"'
    if action == "retrieve":
        return f"retrieve {params['k']} documents and answer with them"
    if action == "reject_answer":
        n = params["max_regenerations"]
        times = "time" if n == 1 else "times"
        return (
            f"reject the answer and regenerate (at most {n} {times}), then abstain with "
            f'message "{message}"'
        )
    if action == "flag_poisoned":
        verb = "drop it" if params["mode"] == "drop" else "move it to quarantine"
        return f"flag the document as poisoned and {verb}"
    return action


def describe_policy(
    policy: Policy, calibration: Mapping[str, Sequence[float]] | None = None
) -> str:
    """Each rule in plain words; with *calibration*, quantile bounds show their raw value."""
    cache = policy.cache
    cache_text = (
        f"memory (max {cache.max_entries} entries"
        if cache.url == "memory"
        else f"{_redact(cache.url)} (fail {cache.fail_mode}, timeout {cache.timeout_s:g} s"
    )
    lines = [
        f"policy '{policy.name}' (version {policy.version}, sha256 {policy.sha256[:12]})",
    ]
    if policy.description:
        lines.append(f"  {policy.description.strip()}")
    lines.append(
        f"student: {policy.student}"
        + (f", proxy model: {policy.proxy_model}" if policy.proxy_model else "")
        + f"; cache: {cache_text}, ttl {cache.ttl_s} s)"
    )
    if policy.requires_calibration:
        lines.append(
            "needs the student's calibration for: " + ", ".join(sorted(policy.requires_calibration))
        )
    guarantees: list[str] = []  # each printed once, after the rules
    for rule in policy.rules:
        where = _SCOPE_WORDS[rule.scope]
        filters = []
        if rule.sources:
            where = "on documents from " + " / ".join(rule.sources)
        if rule.tags:
            joiner = " and " if rule.tags_match == "all" else " or "
            filters.append("tagged " + joiner.join(repr(t) for t in rule.tags))
        if rule.run_names:
            filters.append("in runs matching " + " or ".join(repr(r) for r in rule.run_names))
        if filters:
            where += " (" + ", ".join(filters) + ")"
        when = (
            "always"
            if rule.when is None
            else "when " + _describe_condition(rule.when, calibration, guarantees)
        )
        message = rule.message or policy.abstain_message
        action = _describe_action(rule.action, rule.params(), message)
        text = f"rule '{rule.name}': {where}, {when}, {action}."
        if rule.description:
            text += f" ({rule.description.strip()})"
        lines.append(text)
    lines.append(
        "otherwise: " + _describe_action(policy.default_action, {}, policy.abstain_message) + "."
    )
    lines.extend(f"calibrated guarantee {i}: {text}" for i, text in enumerate(guarantees, 1))
    return "\n".join(lines)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
