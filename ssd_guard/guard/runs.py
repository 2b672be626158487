"""The run a guarded call belongs to: binding its ``run_id`` / ``parent_run_id`` for the
audit, and the step numbers of each run's events."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import structlog

from ssd_guard.audit import bind_run

__all__ = ["StepCounter", "bind", "bound_parent", "current_run"]

_MAX_TRACKED_RUNS = 4096


class StepCounter:
    """Step numbers per run id (bounded LRU; shared by copies of a guard)."""

    def __init__(self, max_runs: int = _MAX_TRACKED_RUNS) -> None:
        self._steps: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_runs

    def next(self, run_id: str) -> int:
        with self._lock:
            step = self._steps.pop(run_id, 0) + 1
            self._steps[run_id] = step
            while len(self._steps) > self._max:
                self._steps.popitem(last=False)
            return step


@contextlib.contextmanager
def bind(run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[str]:
    """Bind a run (audit ``run_id`` / ``parent_run_id``) for the calls inside (see
    :meth:`Guard.bind <ssd_guard.guard.Guard.bind>`). Yields the run id."""
    bound = structlog.contextvars.get_contextvars().get("run_id")
    if bound is not None and (
        run_id is None or (str(run_id) == str(bound) and parent_run_id is None)
    ):
        yield str(bound)
        return
    if run_id is None:
        run_id = uuid.uuid4().hex
    with bind_run(str(run_id), None if parent_run_id is None else str(parent_run_id)):
        yield str(run_id)


def current_run() -> tuple[str, str | None]:
    """The bound run: ``(run_id, parent_run_id)``."""
    ctx = structlog.contextvars.get_contextvars()
    parent = ctx.get("parent_run_id")
    return str(ctx["run_id"]), None if parent is None else str(parent)


def bound_parent() -> str | None:
    """The bound ``parent_run_id``, if any."""
    parent = structlog.contextvars.get_contextvars().get("parent_run_id")
    return None if parent is None else str(parent)
