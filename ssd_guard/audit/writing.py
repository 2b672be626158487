"""Writing the audit trail: one ``guard.decision`` event per guarded step, as JSON lines.

:func:`configure_audit` opens a dedicated JSON-lines sink (a file and/or a stream) with its
own structlog processor chain (contextvars merge, ISO-8601 UTC timestamp, JSONRenderer); it
never calls ``structlog.configure``, so an application's own structlog setup is left alone.
:func:`emit_decision` writes exactly one event per call:

* to the sink opened by :func:`configure_audit`, when there is one;
* else, when the application configured structlog (``structlog.is_configured()``, which
  includes ``structlog.testing.capture_logs()``), through that pipeline as
  ``ssd_guard.audit``;
* else (no configuration at all) as a JSON line on **stderr**, or appended to the file named
  by ``$SSD_GUARD_AUDIT_LOG`` -- never on stdout, so it does not mix with a program's output.

:func:`bind_run` binds run context (``run_id`` ...) that every event emitted inside carries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "AUDIT_LOG_ENV",
    "DECISION_EVENT",
    "bind_run",
    "close_audit",
    "configure_audit",
    "emit_decision",
]

#: The name of the one event the guard emits per decision.
DECISION_EVENT = "guard.decision"

#: Environment variable naming the JSON-lines file used when nothing was configured.
AUDIT_LOG_ENV = "SSD_GUARD_AUDIT_LOG"

_log = structlog.get_logger("ssd_guard.audit")


# --------------------------------------------------------------------------------------
# Sink
# --------------------------------------------------------------------------------------
class _JsonLinesSink:
    """A structlog "wrapped logger" writing each rendered line to a file and/or a stream.

    ``stderr=True`` writes to whatever ``sys.stderr`` is at the time of each write.
    """

    def __init__(self, path: Path | None, stream: IO[str] | None, *, stderr: bool = False) -> None:
        self.path = path
        self.stream = stream
        self.stderr = stderr
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        line = message + "\n"
        with self._lock:
            outs = (self._file, self.stream, sys.stderr if self.stderr else None)
            for out in outs:
                if out is None:
                    continue
                try:
                    out.write(line)
                    out.flush()
                except (OSError, ValueError) as exc:  # a closed stream must not crash a step
                    with contextlib.suppress(OSError, ValueError):
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


def _wrap(sink: _JsonLinesSink) -> Any:
    return structlog.wrap_logger(
        sink,
        processors=_PROCESSORS,
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    )


@dataclass
class _AuditState:
    sink: _JsonLinesSink | None = None
    logger: Any = None
    key: tuple[str | None, int | str | None] | None = None
    forward: bool | None = None
    default_sink: _JsonLinesSink | None = None
    default_logger: Any = None
    default_key: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _AuditState()


def configure_audit(
    path: str | Path | None = None,
    *,
    stream: IO[str] | None = None,
    forward: bool | None = None,
) -> None:
    """Send ``guard.decision`` events as JSON lines to *path* (appended) and/or *stream*.

    With neither, lines go to ``sys.stderr`` (whatever it is when an event is written).
    Idempotent: the same arguments again change nothing; other arguments replace the
    previous sink (closing a file it opened). *forward* also sends each event through the
    global structlog pipeline: ``None`` (auto) = when structlog has been configured by the
    application (or a test captures logs).
    """
    resolved = Path(path).expanduser().resolve() if path is not None else None
    to_stderr = path is None and stream is None
    stream_key: int | str | None = "stderr" if to_stderr else id(stream) if stream else None
    key = (str(resolved) if resolved else None, stream_key)
    with _STATE.lock:
        _STATE.forward = forward
        if _STATE.key == key and _STATE.sink is not None:
            return
        old = _STATE.sink
        sink = _JsonLinesSink(resolved, stream, stderr=to_stderr)
        _STATE.sink = sink
        _STATE.key = key
        _STATE.logger = _wrap(sink)
    if old is not None:
        old.close()


def close_audit() -> None:
    """Close the sink opened by :func:`configure_audit` (and the default file sink); later
    events go where they go without configuration (see the module docstring)."""
    with _STATE.lock:
        old, default = _STATE.sink, _STATE.default_sink
        _STATE.sink = _STATE.logger = _STATE.key = _STATE.forward = None
        _STATE.default_sink = _STATE.default_logger = _STATE.default_key = None
    for sink in (old, default):
        if sink is not None:
            sink.close()


def _default_logger() -> Any:
    """The logger used when nothing is configured: JSON lines on stderr, or appended to
    ``$SSD_GUARD_AUDIT_LOG`` (falling back to stderr, once, if that file cannot be opened)."""
    target = os.environ.get(AUDIT_LOG_ENV) or None
    with _STATE.lock:
        if _STATE.default_logger is not None and _STATE.default_key == target:
            return _STATE.default_logger
        old = _STATE.default_sink
        sink: _JsonLinesSink | None = None
        if target is not None:
            try:
                sink = _JsonLinesSink(Path(target).expanduser(), None)
            except OSError as exc:
                with contextlib.suppress(OSError, ValueError):
                    print(
                        f"ssd-guard: cannot open ${AUDIT_LOG_ENV}={target!r} "
                        f"({exc.strerror or exc}); audit events go to stderr",
                        file=sys.stderr,
                    )
        if sink is None:
            sink = _JsonLinesSink(None, None, stderr=True)
        _STATE.default_sink, _STATE.default_key = sink, target
        _STATE.default_logger = _wrap(sink)
        logger = _STATE.default_logger
    if old is not None:
        old.close()
    return logger


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
    app_structlog = structlog.is_configured()
    if logger is None and not app_structlog:
        logger = _default_logger()
    if logger is not None:
        logger.info(DECISION_EVENT, **fields)
    if forward is None:
        forward = app_structlog
    if forward:
        _log.info(DECISION_EVENT, **fields)
    return {"event": DECISION_EVENT, **fields}
