"""Reading the audit trail back: :func:`read_events` / :func:`scan_events` and
:func:`filter_events`.

A log is read as bytes and split on ``\\n`` only, so one bad line never costs more than
itself: a line that is not UTF-8 (a torn multibyte character included), not a JSON object,
or a ``guard.decision`` event whose fields have the wrong shape (``scores`` that is not an
object, a NaN score, ``tags: 5``...) is skipped and counted, never raised (unless
``strict=True``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog

from ssd_guard.audit.writing import DECISION_EVENT
from ssd_guard.errors import SSDGuardError, type_phrase

__all__ = [
    "EventScan",
    "event_problem",
    "filter_events",
    "read_events",
    "scan_events",
]

_log = structlog.get_logger("ssd_guard.audit")

#: Fields holding ``{name: number}`` maps.
_NUMBER_MAPS = ("scores", "thresholds", "latency_ms")
#: Fields that must be a string (or null) where present.
_TEXT_FIELDS = ("scope", "action", "rule", "timestamp", "run_name", "source")
#: Fields that must be a scalar (string, number, boolean or null) where present.
_SCALAR_FIELDS = ("run_id", "parent_run_id", "step")
#: How many skipped lines :class:`EventScan` remembers the reason of.
_MAX_PROBLEMS = 20


def _kind(value: Any) -> str:
    return type_phrase(value, mapping="an object")


def restore_number(value: Any) -> Any:
    """``"inf"`` / ``"-inf"`` (how the writer logs infinities) back to floats."""
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return value


def event_problem(ev: Mapping[str, Any]) -> str | None:
    """Why a ``guard.decision`` event cannot be summarised or replayed, or ``None``.

    Checks the shape of the fields the readers use: ``scores`` / ``thresholds`` /
    ``latency_ms`` are objects of numbers (or null, ``"inf"``, ``"-inf"``; never NaN, which
    the writer logs as null); ``scope``,
    ``action``, ``rule``, ``timestamp``, ``run_name``, ``source`` are strings; ``run_id``,
    ``parent_run_id``, ``step`` are scalars; ``tags`` is a string or a list of strings;
    ``missing_scores`` is a list.
    """
    for key in _NUMBER_MAPS:
        values = ev.get(key)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            return f"{key} is not an object (got {_kind(values)})"
        for name, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                # the writer logs NaN as null: a NaN (JSON's non-standard literal) is no
                # score any guard wrote, and counted as good it would vanish from the stats
                return f"{key}.{name} is NaN (not a number)"
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    float(value)
                except OverflowError:
                    return f"{key}.{name} is out of range"
    for key in _TEXT_FIELDS:
        if ev.get(key) is not None and not isinstance(ev[key], str):
            return f"{key} is not a string (got {_kind(ev[key])})"
    for key in _SCALAR_FIELDS:
        value = ev.get(key)
        if isinstance(value, list | dict):
            return f"{key} is not a string or number (got {_kind(value)})"
    tags = ev.get("tags")
    tags_ok = isinstance(tags, list) and all(isinstance(t, str) for t in tags)
    if tags is not None and not isinstance(tags, str) and not tags_ok:
        return f"tags is not a list of strings (got {_kind(tags)})"
    missing = ev.get("missing_scores")
    if missing is not None and not isinstance(missing, list):
        return f"missing_scores is not a list (got {_kind(missing)})"
    return None


@dataclass
class EventScan:
    """What :func:`scan_events` found in a log."""

    source: str
    """The file (or stream) name."""
    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    """Lines skipped as unreadable or malformed (blank lines are not counted)."""
    problems: list[tuple[int, str]] = field(default_factory=list)
    """``(line number, reason)`` of the first skipped lines."""

    def skip(self, lineno: int, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append((lineno, reason))


def _raw_lines(path: str | Path | IO[str] | IO[bytes], name: str) -> Iterator[bytes | str | None]:
    """The log's lines; ``None`` for a text stream that failed to decode (it cannot resync).

    A UTF-8 text stream (``sys.stdin``...) is read with ``errors="surrogateescape"`` for the
    duration, so that a bad byte costs only its line; its setting is restored afterwards.
    """
    if isinstance(path, str | Path):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SSDGuardError(f"{name}: cannot read audit log: {exc.strerror or exc}") from None
        yield from data.split(b"\n")
        return
    encoding = str(getattr(path, "encoding", "") or "").lower().replace("-", "").replace("_", "")
    errors = getattr(path, "errors", None)
    reconfigure = getattr(path, "reconfigure", None)
    escaped = False
    if callable(reconfigure) and encoding == "utf8" and errors == "strict":
        with contextlib.suppress(Exception):
            reconfigure(errors="surrogateescape")
            escaped = True
    try:
        while True:
            try:
                line = path.readline()
            except UnicodeDecodeError:
                yield None
                return
            if not line:
                return
            if escaped and isinstance(line, str):
                yield line.encode("utf-8", "surrogateescape")
            else:
                yield line
    finally:
        if escaped and callable(reconfigure):
            with contextlib.suppress(Exception):
                reconfigure(errors=errors)


def _decode(raw: bytes | str | None) -> str:
    if raw is None:
        raise UnicodeError("not UTF-8 text")
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise UnicodeError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return raw.rstrip("\r\n")


def scan_events(
    path: str | Path | IO[str] | IO[bytes],
    *,
    event: str | None = DECISION_EVENT,
    strict: bool = False,
) -> EventScan:
    """Parse a JSON-lines audit log (*event* = ``None`` keeps every event) and count the
    lines it had to skip (see the module docstring); ``strict=True`` raises
    :class:`SSDGuardError` ``FILE:LINE: reason`` on the first one instead."""
    name = str(path) if isinstance(path, str | Path) else getattr(path, "name", "<stream>")
    scan = EventScan(source=str(name))
    for lineno, raw in enumerate(_raw_lines(path, scan.source), 1):
        try:
            line = _decode(raw)
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"not a JSON object (got {_kind(obj)})")
            if event is not None and obj.get("event") != event:
                continue
            if obj.get("event") == DECISION_EVENT:
                problem = event_problem(obj)
                if problem is not None:
                    raise ValueError(problem)
        except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
            reason = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
            if strict:
                raise SSDGuardError(f"{scan.source}:{lineno}: not a JSON event: {reason}") from None
            scan.skip(lineno, reason)
            continue
        for key in _NUMBER_MAPS:
            if isinstance(obj.get(key), dict):
                obj[key] = {k: restore_number(v) for k, v in obj[key].items()}
        scan.events.append(obj)
    return scan


def read_events(
    path: str | Path | IO[str] | IO[bytes],
    *,
    event: str | None = DECISION_EVENT,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Parse a JSON-lines audit file (*event* = ``None`` keeps every event).

    Blank lines are skipped; a malformed line (a truncated last line, bytes that are not
    UTF-8, a decision whose fields have the wrong shape) is skipped with one
    ``audit.read.skipped_lines`` warning, or raises :class:`SSDGuardError` with
    ``strict=True``. :func:`scan_events` also returns the count and the reasons.
    """
    scan = scan_events(path, event=event, strict=strict)
    if scan.skipped:
        _log.warning(
            "audit.read.skipped_lines",
            path=scan.source,
            skipped=scan.skipped,
            first=[f"line {n}: {why}" for n, why in scan.problems[:3]],
        )
    return scan.events


def parse_time(value: str | datetime | None) -> datetime | None:
    """An ISO-8601 date/time (``Z`` allowed; naive = UTC), or ``None``."""
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
    """The well-formed ``guard.decision`` events that pass the filters (see
    :func:`~ssd_guard.audit.summarise`); malformed ones (:func:`event_problem`) are left out."""
    start, end = parse_time(since), parse_time(until)
    out = []
    for ev in events:
        if not isinstance(ev, Mapping) or ev.get("event", DECISION_EVENT) != DECISION_EVENT:
            continue
        if event_problem(ev) is not None:
            continue
        if run_id is not None and run_id not in (ev.get("run_id"), ev.get("parent_run_id")):
            continue
        if action is not None and ev.get("action") != action:
            continue
        if start is not None or end is not None:
            try:
                ts = parse_time(ev.get("timestamp"))
            except SSDGuardError:
                ts = None
            if ts is None or (start is not None and ts < start) or (end is not None and ts > end):
                continue
        out.append(ev)
    return out
