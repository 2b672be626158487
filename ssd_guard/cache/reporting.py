"""Failures absorbed in fail-open mode, collected for the caller (:func:`collect_errors`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_ERROR_SINK: ContextVar[list[str] | None] = ContextVar("ssd_guard_cache_errors", default=None)


@contextlib.contextmanager
def collect_errors() -> Iterator[list[str]]:
    """Collect the kinds of the cache failures absorbed (``fail_mode="open"``: the call
    became a miss / a skipped write) by cache calls made inside the block, in this thread
    or asyncio task: ``"connection"``, ``"timeout"``, ``"circuit-open"`` (Redis skipped
    during the cooldown after a failure) or ``"error"`` (any other Redis error)."""
    sink: list[str] = []
    token = _ERROR_SINK.set(sink)
    try:
        yield sink
    finally:
        _ERROR_SINK.reset(token)


def report_error(kind: str) -> None:
    """Record an absorbed cache failure for the enclosing :func:`collect_errors` (if any);
    custom :class:`ScoreCache` implementations that fail open call it too."""
    sink = _ERROR_SINK.get()
    if sink is not None:
        sink.append(kind)
