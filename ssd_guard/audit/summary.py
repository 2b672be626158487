"""What the guard did, from its audit events: :func:`summarise` and :func:`format_summary`."""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from ssd_guard.audit.reading import filter_events

__all__ = ["format_summary", "summarise"]


def _number(value: Any) -> float | None:
    """A finite number as float; anything else (bool, text, inf, NaN, null) as None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number):
            return number
    return None


def _total_latency(ev: Mapping[str, Any]) -> float | None:
    lat = ev.get("latency_ms")
    if not isinstance(lat, Mapping) or not lat:
        return None
    total = _number(lat.get("total"))
    if total is not None:
        return total
    nums = [n for v in lat.values() if (n := _number(v)) is not None]
    return sum(nums) if nums else None


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    p50, p90 = np.percentile(arr, [50.0, 90.0])  # linear interpolation
    return {
        "count": int(arr.size),
        "min": float(arr.min()),
        "p50": float(p50),
        "p90": float(p90),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
    }


def _histogram(values: Sequence[float], bins: int = 10, width: int = 30) -> str:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return "(no finite values)"
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        return f"[{lo:10.4g}, {hi:10.4g}]  {'#' * width}  {arr.size}"
    counts, edges = np.histogram(arr, bins=bins, range=(lo, hi))
    top = int(counts.max())
    lines = []
    for i, c in enumerate(counts.tolist()):
        bar = "#" * (round(c / top * width) if c else 0)
        close = "]" if i == bins - 1 else ")"
        lines.append(f"[{edges[i]:10.4g}, {edges[i + 1]:10.4g}{close} {bar:<{width}} {c}")
    return "\n".join(lines)


def summarise(
    events: Iterable[Mapping[str, Any]],
    *,
    run_id: str | None = None,
    action: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    slowest: int = 5,
) -> dict[str, Any]:
    """What the guard did: decisions per action / rule / scope, cache hits, score
    histograms (text), latency stats and the slowest steps. *run_id* matches an event's
    ``run_id`` or ``parent_run_id`` (a whole agent run with its sub-calls)."""
    evs = filter_events(events, run_id=run_id, action=action, since=since, until=until)
    by_action = Counter(str(ev.get("action")) for ev in evs)
    by_rule = Counter(ev.get("rule") or "(default)" for ev in evs)
    by_scope = Counter(str(ev.get("scope")) for ev in evs)
    runs = {ev.get("parent_run_id") or ev.get("run_id") for ev in evs}
    hits = sum(1 for ev in evs if ev.get("cache_hit") is True)
    misses = sum(1 for ev in evs if ev.get("cache_hit") is False)
    score_values: dict[str, list[float]] = {}
    missing = 0
    for ev in evs:
        for metric, value in (ev.get("scores") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                if (number := _number(value)) is not None:
                    score_values.setdefault(metric, []).append(number)
            else:
                missing += 1
        if ev.get("missing_scores"):
            missing += len(ev["missing_scores"])
    scores = {
        metric: {**_stats(vals), "histogram": _histogram(vals)}
        for metric, vals in sorted(score_values.items())
    }
    lat_values: dict[str, list[float]] = {}
    for ev in evs:
        lat = ev.get("latency_ms") or {}
        for stage, value in lat.items():
            if (number := _number(value)) is not None:
                lat_values.setdefault(stage, []).append(number)
        if "total" not in lat:
            total = _total_latency(ev)
            if total is not None:
                lat_values.setdefault("total", []).append(total)
    latency = {stage: _stats(vals) for stage, vals in sorted(lat_values.items())}
    timed = [(t, ev) for ev in evs if (t := _total_latency(ev)) is not None]
    timed.sort(key=lambda pair: pair[0], reverse=True)
    timestamps = sorted(str(ev["timestamp"]) for ev in evs if ev.get("timestamp"))
    return {
        "events": len(evs),
        "runs": len(runs),
        "first": timestamps[0] if timestamps else None,
        "last": timestamps[-1] if timestamps else None,
        "filters": {"run_id": run_id, "action": action, "since": since, "until": until},
        "by_action": dict(by_action.most_common()),
        "by_rule": dict(by_rule.most_common()),
        "by_scope": dict(by_scope.most_common()),
        "blocked": sum(by_action.get(a, 0) for a in ("abstain", "reject_answer")),
        "cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
        },
        "missing_scores": missing,
        "scores": scores,
        "latency_ms": latency,
        "slowest": [
            {
                "run_id": ev.get("run_id"),
                "step": ev.get("step"),
                "scope": ev.get("scope"),
                "action": ev.get("action"),
                "rule": ev.get("rule"),
                "total_ms": t,
                "timestamp": ev.get("timestamp"),
            }
            for t, ev in timed[:slowest]
        ],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """:func:`summarise`'s dict as readable text."""
    out = io.StringIO()
    w = out.write
    filters = {k: v for k, v in (summary.get("filters") or {}).items() if v is not None}
    w(f"{summary['events']} decisions in {summary['runs']} runs")
    if summary.get("first"):
        w(f", {summary['first']} .. {summary['last']}")
    w("\n")
    if filters:
        w("filters: " + ", ".join(f"{k}={v}" for k, v in filters.items()) + "\n")
    if not summary["events"]:
        return out.getvalue().rstrip("\n")
    total = summary["events"]

    def table(title: str, counts: Mapping[str, int]) -> None:
        w(f"\n{title}:\n")
        width = max(len(k) for k in counts)
        for k, n in counts.items():
            w(f"  {k:<{width}}  {n:6d}  {100 * n / total:5.1f} %\n")

    table("by action", summary["by_action"])
    table("by rule", summary["by_rule"])
    table("by scope", summary["by_scope"])
    cache = summary["cache"]
    if cache["hit_rate"] is not None:
        w(
            f"\ncache: {cache['hits']} hits, {cache['misses']} misses "
            f"({100 * cache['hit_rate']:.1f} % hit rate)\n"
        )
    if summary.get("missing_scores"):
        w(f"missing scores: {summary['missing_scores']}\n")
    for metric, st in summary["scores"].items():
        w(
            f"\n{metric}: n={st['count']} min={st['min']:.4g} p50={st['p50']:.4g} "
            f"p90={st['p90']:.4g} max={st['max']:.4g} mean={st['mean']:.4g}\n"
        )
        for line in st["histogram"].splitlines():
            w(f"  {line}\n")
    if summary["latency_ms"]:
        w("\nlatency (ms):\n")
        width = max(len(k) for k in summary["latency_ms"])
        for stage, st in summary["latency_ms"].items():
            w(
                f"  {stage:<{width}}  p50 {st['p50']:9.2f}  p90 {st['p90']:9.2f}  "
                f"max {st['max']:9.2f}  (n={st['count']})\n"
            )
    if summary["slowest"]:
        w("\nslowest steps:\n")
        for row in summary["slowest"]:
            w(
                f"  {row['total_ms']:9.2f} ms  run {row['run_id']} step {row['step']} "
                f"{row['scope']} -> {row['action']}"
                + (f" ({row['rule']})" if row.get("rule") else "")
                + "\n"
            )
    return out.getvalue().rstrip("\n")
