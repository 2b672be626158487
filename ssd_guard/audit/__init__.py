"""The audit trail: one ``guard.decision`` event per guarded step, as JSON lines.

:mod:`~ssd_guard.audit.writing`
    :func:`configure_audit`, :func:`emit_decision`, :func:`bind_run`. Without any
    configuration events are JSON lines on stderr (or appended to ``$SSD_GUARD_AUDIT_LOG``);
    an application that configured structlog gets them through its own pipeline.
:mod:`~ssd_guard.audit.reading`
    :func:`read_events` / :func:`scan_events` (bad lines are skipped and counted, never
    raised) and :func:`filter_events`.
:mod:`~ssd_guard.audit.summary`
    :func:`summarise` / :func:`format_summary`: what the guard did.
:mod:`~ssd_guard.audit.replay`
    :func:`replay` / :func:`format_replay`: what another policy would have done, from the
    logged scores alone (no model is loaded).
"""

from __future__ import annotations

from ssd_guard.audit.reading import (
    EventScan,
    event_problem,
    filter_events,
    read_events,
    scan_events,
)
from ssd_guard.audit.replay import ReplayRow, format_replay, replay
from ssd_guard.audit.summary import format_summary, summarise
from ssd_guard.audit.writing import (
    AUDIT_LOG_ENV,
    DECISION_EVENT,
    bind_run,
    close_audit,
    configure_audit,
    emit_decision,
)

__all__ = [
    "AUDIT_LOG_ENV",
    "DECISION_EVENT",
    "EventScan",
    "ReplayRow",
    "bind_run",
    "close_audit",
    "configure_audit",
    "emit_decision",
    "event_problem",
    "filter_events",
    "format_replay",
    "format_summary",
    "read_events",
    "replay",
    "scan_events",
    "summarise",
]
