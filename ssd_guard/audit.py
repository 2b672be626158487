"""The audit trail: one ``guard.decision`` event per guarded step, as JSON lines.

Writing
    :func:`configure_audit` opens a dedicated JSON-lines sink (a file and/or a stream) with
    its own structlog processor chain (contextvars merge, ISO-8601 UTC timestamp,
    JSONRenderer); it never calls ``structlog.configure``, so an application's own structlog
    setup is left alone. :func:`emit_decision` writes exactly one event per call to that sink
    and, when the application uses structlog (``structlog.is_configured()``, which includes
    ``structlog.testing.capture_logs()``) or no sink is configured, also logs it through the
    global structlog pipeline as ``ssd_guard.audit``. :func:`bind_run` binds run context
    (``run_id`` ...) that every event emitted inside it carries.

Reading
    :func:`read_events`, :func:`summarise` / :func:`format_summary` (what the guard did), and
    :func:`replay` (what another policy would have done, from the logged scores alone -- no
    model is loaded).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from ssd_guard.errors import SSDGuardError

if TYPE_CHECKING:
    from ssd_guard.policy import Policy

__all__ = [
    "DECISION_EVENT",
    "ReplayRow",
    "bind_run",
    "close_audit",
    "configure_audit",
    "emit_decision",
    "filter_events",
    "format_replay",
    "format_summary",
    "read_events",
    "replay",
    "summarise",
]

#: The name of the one event the guard emits per decision.
DECISION_EVENT = "guard.decision"

_log = structlog.get_logger("ssd_guard.audit")


# --------------------------------------------------------------------------------------
# Sink
# --------------------------------------------------------------------------------------
class _JsonLinesSink:
    """A structlog "wrapped logger" writing each rendered line to a file and/or a stream."""

    def __init__(self, path: Path | None, stream: IO[str] | None) -> None:
        self.path = path
        self.stream = stream
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            for out in (self._file, self.stream):
                if out is None:
                    continue
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError) as exc:  # a closed stream must not crash a step
                    print(f"ssd-guard: audit write failed: {exc}", file=sys.stderr)

    info = warning = error = critical = debug = log = msg

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _add_timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    if "timestamp" not in event_dict:
        event_dict["timestamp"] = _now_iso()
    return event_dict


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            return item()
    return repr(obj)


def _deep_clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return _clean_number(obj)
    if isinstance(obj, Mapping):
        return {str(k): _deep_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_deep_clean(v) for v in obj]
    return obj


def _dumps(obj: Any, **_: Any) -> str:
    return json.dumps(_deep_clean(obj), default=_json_default, ensure_ascii=False, allow_nan=False)


_FIRST_KEYS = ("event", "timestamp")


def _order_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update((k, v) for k, v in event_dict.items() if k not in ordered)
    return ordered


_PROCESSORS: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    _add_timestamp,
    _order_keys,
    structlog.processors.JSONRenderer(serializer=_dumps),
]


@dataclass
class _AuditState:
    sink: _JsonLinesSink | None = None
    logger: Any = None
    key: tuple[str | None, int | None] | None = None
    forward: bool | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _AuditState()


def configure_audit(
    path: str | Path | None = None,
    *,
    stream: IO[str] | None = None,
    forward: bool | None = None,
) -> None:
    """Send ``guard.decision`` events as JSON lines to *path* (appended) and/or *stream*.

    With neither, lines go to ``sys.stderr``. Idempotent: the same arguments again change
    nothing; other arguments replace the previous sink (closing a file it opened).
    *forward* also sends each event through the global structlog pipeline: ``None`` (auto)
    = when structlog has been configured by the application (or a test captures logs).
    """
    if path is None and stream is None:
        stream = sys.stderr
    resolved = Path(path).expanduser().resolve() if path is not None else None
    key = (str(resolved) if resolved else None, id(stream) if stream is not None else None)
    with _STATE.lock:
        _STATE.forward = forward
        if _STATE.key == key and _STATE.sink is not None:
            return
        old = _STATE.sink
        sink = _JsonLinesSink(resolved, stream)
        _STATE.sink = sink
        _STATE.key = key
        _STATE.logger = structlog.wrap_logger(
            sink,
            processors=_PROCESSORS,
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        )
    if old is not None:
        old.close()


def close_audit() -> None:
    """Close the sink opened by :func:`configure_audit` (events then only go to structlog)."""
    with _STATE.lock:
        old, _STATE.sink, _STATE.logger, _STATE.key, _STATE.forward = (
            _STATE.sink,
            None,
            None,
            None,
            None,
        )
    if old is not None:
        old.close()


@contextlib.contextmanager
def bind_run(run_id: str, parent_run_id: str | None = None, **extra: Any) -> Iterator[None]:
    """Bind ``run_id`` / ``parent_run_id`` / *extra* to every event logged inside (also by
    other structlog loggers that merge contextvars); restored on exit, nesting works."""
    with structlog.contextvars.bound_contextvars(
        run_id=run_id, parent_run_id=parent_run_id, **extra
    ):
        yield


def _clean_number(value: Any) -> Any:
    """NaN -> None; +-inf -> "inf" / "-inf" (JSON has neither); other values unchanged."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        with contextlib.suppress(Exception):
            return _clean_number(item())
    return value


def _clean_map(values: Mapping[str, Any] | None) -> dict[str, Any]:
    return {str(k): _clean_number(v) for k, v in (values or {}).items()}


def emit_decision(
    *,
    run_id: str | None,
    parent_run_id: str | None,
    step: int | str | None,
    scope: str,
    model_id: str | None,
    hidden_state_source: str | None,
    student_fingerprint: str | None,
    policy_name: str,
    policy_sha256: str,
    scores: Mapping[str, float | None],
    thresholds: Mapping[str, float | None],
    rule: str | None,
    action: str,
    cache_hit: bool | None,
    latency_ms: Mapping[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """Emit exactly one ``guard.decision`` event and return its fields.

    ``hidden_state_source`` says whose hidden states were read (``"model"``, ``"proxy:ID"``);
    ``latency_ms`` maps stages to milliseconds (``total`` counts as the step's latency, else
    the sum). *extra* carries anything else worth replaying (``tags``, ``run_name``,
    ``source``, ``message``, ``missing_scores``...). NaN scores become ``null``.
    """
    fields: dict[str, Any] = {
        "timestamp": _now_iso(),
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "step": step,
        "scope": scope,
        "model_id": model_id,
        "hidden_state_source": hidden_state_source,
        "student_fingerprint": student_fingerprint,
        "policy_name": policy_name,
        "policy_sha256": policy_sha256,
        "scores": _clean_map(scores),
        "thresholds": _clean_map(thresholds),
        "rule": rule,
        "action": action,
        "cache_hit": cache_hit,
        "latency_ms": _clean_map(latency_ms),
    }
    for key, value in extra.items():
        fields[key] = list(value) if isinstance(value, tuple | set | frozenset) else value
    logger, forward = _STATE.logger, _STATE.forward
    if logger is not None:
        logger.info(DECISION_EVENT, **fields)
    if forward is None:
        forward = logger is None or structlog.is_configured()
    if forward:
        _log.info(DECISION_EVENT, **fields)
    return {"event": DECISION_EVENT, **fields}


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _restore_number(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value


def read_events(
    path: str | Path | IO[str], *, event: str | None = DECISION_EVENT, strict: bool = False
) -> list[dict[str, Any]]:
    """Parse a JSON-lines audit file (*event* = ``None`` keeps every event).

    Blank lines are skipped; a malformed line (e.g. a truncated last line) is skipped with
    one ``audit.read.skipped_lines`` warning, or raises :class:`SSDGuardError` with
    ``strict=True``.
    """
    events, skipped, name = _read_events(path, event=event, strict=strict)
    if skipped:
        _log.warning("audit.read.skipped_lines", path=name, skipped=skipped)
    return events


def _read_events(
    path: str | Path | IO[str], *, event: str | None, strict: bool
) -> tuple[list[dict[str, Any]], int, str]:
    if isinstance(path, str | Path):
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SSDGuardError(f"{name}: cannot read audit log: {exc.strerror or exc}") from None
        lines: Iterable[str] = text.splitlines()
    else:
        name = getattr(path, "name", "<stream>")
        lines = path
    out: list[dict[str, Any]] = []
    skipped = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if strict:
                raise SSDGuardError(f"{name}:{lineno}: not a JSON event: {exc}") from None
            skipped += 1
            continue
        if event is not None and obj.get("event") != event:
            continue
        for key in ("scores", "thresholds", "latency_ms"):
            if isinstance(obj.get(key), dict):
                obj[key] = {k: _restore_number(v) for k, v in obj[key].items()}
        out.append(obj)
    return out, skipped, name


def _parse_time(value: str | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise SSDGuardError(f"not an ISO-8601 date/time: {value!r}") from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def filter_events(
    events: Iterable[Mapping[str, Any]],
    *,
    run_id: str | None,
    action: str | None,
    since: str | datetime | None,
    until: str | datetime | None,
) -> list[Mapping[str, Any]]:
    """The ``guard.decision`` events that pass the filters (see :func:`summarise`)."""
    start, end = _parse_time(since), _parse_time(until)
    out = []
    for ev in events:
        if ev.get("event", DECISION_EVENT) != DECISION_EVENT:
            continue
        if run_id is not None and run_id not in (ev.get("run_id"), ev.get("parent_run_id")):
            continue
        if action is not None and ev.get("action") != action:
            continue
        if start is not None or end is not None:
            try:
                ts = _parse_time(ev.get("timestamp"))
            except SSDGuardError:
                ts = None
            if ts is None or (start is not None and ts < start) or (end is not None and ts > end):
                continue
        out.append(ev)
    return out


def _total_latency(ev: Mapping[str, Any]) -> float | None:
    lat = ev.get("latency_ms")
    if not isinstance(lat, Mapping) or not lat:
        return None
    if isinstance(lat.get("total"), int | float):
        return float(lat["total"])
    nums = [float(v) for v in lat.values() if isinstance(v, int | float) and math.isfinite(v)]
    return sum(nums) if nums else None


def _pct(sorted_values: Sequence[float], q: float) -> float:
    n = len(sorted_values)
    if n == 1:
        return sorted_values[0]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    vs = sorted(values)
    return {
        "count": len(vs),
        "min": vs[0],
        "p50": _pct(vs, 0.5),
        "p90": _pct(vs, 0.9),
        "max": vs[-1],
        "mean": sum(vs) / len(vs),
    }


def _histogram(values: Sequence[float], bins: int = 10, width: int = 30) -> str:
    vs = [v for v in values if math.isfinite(v)]
    if not vs:
        return "(no finite values)"
    lo, hi = min(vs), max(vs)
    if lo == hi:
        return f"[{lo:10.4g}, {hi:10.4g}]  {'#' * width}  {len(vs)}"
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in vs:
        counts[min(int((v - lo) / step), bins - 1)] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        a, b = lo + i * step, lo + (i + 1) * step
        bar = "#" * (round(c / top * width) if c else 0)
        close = "]" if i == bins - 1 else ")"
        lines.append(f"[{a:10.4g}, {b:10.4g}{close} {bar:<{width}} {c}")
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
                if math.isfinite(value):
                    score_values.setdefault(metric, []).append(float(value))
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
            if isinstance(value, int | float) and math.isfinite(value):
                lat_values.setdefault(stage, []).append(float(value))
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


# --------------------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplayRow:
    """One logged decision re-decided under another policy."""

    run_id: str | None
    step: int | str | None
    scope: str
    timestamp: str | None
    scores: dict[str, float]
    old_action: str
    old_rule: str | None
    new_action: str
    new_rule: str | None
    new_thresholds: dict[str, float]
    missing_scores: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.old_action, self.old_rule) != (self.new_action, self.new_rule)

    @property
    def action_changed(self) -> bool:
        return self.old_action != self.new_action

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing_scores"] = list(self.missing_scores)
        d["changed"] = self.changed
        d["action_changed"] = self.action_changed
        return d


def replay(
    policy: Policy,
    events: Iterable[Mapping[str, Any]],
    calibration: Mapping[str, Sequence[float]] | None = None,
) -> list[ReplayRow]:
    """Re-decide every logged ``guard.decision`` from its logged scores under *policy*
    (no model). The logged ``tags``, ``run_name`` and ``source`` feed the rule filters.
    A policy with quantile thresholds needs *calibration* (:class:`PolicyError` otherwise)."""
    rows: list[ReplayRow] = []
    for ev in events:
        if ev.get("event", DECISION_EVENT) != DECISION_EVENT:
            continue
        scope = ev.get("scope")
        if scope not in ("prompt", "answer", "document"):
            continue
        raw_scores = ev.get("scores") or {}
        scores: dict[str, float | None] = {}
        for metric, value in raw_scores.items():
            value = _restore_number(value)
            scores[metric] = (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else None
            )
        tags = ev.get("tags") or ()
        if isinstance(tags, str):
            tags = (tags,)
        decision = policy.decide(
            scope,
            scores,
            calibration=calibration,
            tags=tuple(tags),
            run_name=ev.get("run_name"),
            source=ev.get("source"),
        )
        rows.append(
            ReplayRow(
                run_id=ev.get("run_id"),
                step=ev.get("step"),
                scope=scope,
                timestamp=ev.get("timestamp"),
                scores=dict(decision.scores),
                old_action=str(ev.get("action")),
                old_rule=ev.get("rule"),
                new_action=decision.action,
                new_rule=decision.rule,
                new_thresholds=dict(decision.thresholds),
                missing_scores=decision.missing_scores,
            )
        )
    return rows


def format_replay(
    rows: Sequence[ReplayRow], policy_name: str | None = None, *, limit: int = 50
) -> str:
    """A transition table (old action -> new action: count) and the first *limit* changed
    steps."""
    changed = [r for r in rows if r.changed]
    head = f"replayed {len(rows)} decisions"
    if policy_name:
        head += f" under policy '{policy_name}'"
    lines = [f"{head}: {len(changed)} changed ({sum(r.action_changed for r in rows)} actions)"]
    transitions = Counter((r.old_action, r.new_action) for r in rows)
    if transitions:
        lines.append("")
        lines.append("old action -> new action:")
        for (old, new), n in sorted(transitions.items(), key=lambda kv: (-kv[1], kv[0])):
            mark = "" if old == new else "   *"
            lines.append(f"  {old:>14} -> {new:<14} {n:6d}{mark}")
    if changed:
        lines.append("")
        lines.append("changed steps:")
        for r in changed[:limit]:
            scores = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.scores.items()))
            lines.append(
                f"  run {r.run_id} step {r.step} {r.scope}: {r.old_action}"
                f" ({r.old_rule or 'default'}) -> {r.new_action} ({r.new_rule or 'default'})"
                f"  [{scores}]"
            )
        if len(changed) > limit:
            lines.append(f"  ... and {len(changed) - limit} more (--json lists them all)")
    return "\n".join(lines)
