"""Micro-batching: coalesce concurrent single-prompt requests into one batched call.

An agent server scores one prompt per request, but the SSD scorer is much cheaper per
prompt in batches (one padded forward pass up to layer ``l``). :class:`MicroBatcher`
sits in between: callers on any number of threads (:meth:`MicroBatcher.submit`) or on an
event loop (``await`` :meth:`MicroBatcher.asubmit`) each hand in one prompt; a single
background worker thread collects the requests that arrive within ``max_wait_ms`` of
the first one (at most ``max_batch``) and calls ``fn(prompts)`` **once** for all of them::

    with MicroBatcher(scorer.score_prompts, max_batch=32, max_wait_ms=2.0) as batcher:
        risk = batcher.submit("Who wrote Hamlet?")          # from a thread
        risk = await batcher.asubmit("Who wrote Hamlet?")   # from a coroutine

``fn`` must return one float per prompt, in order. If it raises (or returns the wrong
number of results), every waiter of that batch gets the exception; later batches are
unaffected. :meth:`MicroBatcher.close` stops accepting requests, finishes the ones
already queued, and joins the worker.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ssd_guard.scoring.ssd import _HIDDEN_PROVIDER

__all__ = ["BatcherClosedError", "BatcherStats", "BatchingScorer", "MicroBatcher"]


class BatcherClosedError(RuntimeError):
    """A request was submitted to (or left behind in) a closed :class:`MicroBatcher`."""


@dataclass
class BatcherStats:
    """Counters of a :class:`MicroBatcher` (read them for monitoring / tests)."""

    requests: int = 0
    batches: int = 0
    errors: int = 0
    largest_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


_STOP = object()


class MicroBatcher:
    """Coalesce concurrent requests into batched calls of ``fn``.

    Args:
        fn: ``fn(prompts) -> list[float]``, one result per prompt, same order (e.g.
            ``SSDScorer.score_prompts``). Called only from the worker thread.
        max_batch: most prompts per call of ``fn``.
        max_wait_ms: how long the worker waits after the first request of a batch for
            more to arrive (``0``: take only what is already queued).
        name: the worker thread's name.
    """

    def __init__(
        self,
        fn: Callable[[list[str]], Sequence[float]],
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        *,
        name: str = "ssd-guard-microbatcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.stats = BatcherStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ public API
    @property
    def closed(self) -> bool:
        return self._closed

    def submit_future(self, prompt: str) -> Future[float]:
        """Queue *prompt*; the returned future resolves to its score."""
        fut: Future[float] = Future()
        with self._lock:  # no request can slip in behind the stop marker
            if self._closed:
                raise BatcherClosedError("this MicroBatcher is closed")
            self._queue.put((prompt, fut))
        return fut

    def submit(self, prompt: str, timeout: float | None = None) -> float:
        """Score *prompt* in the next batch; blocks until it is done (re-raises ``fn``'s
        exception)."""
        if threading.current_thread() is self._worker:
            raise RuntimeError("MicroBatcher.submit called from its own fn: this would deadlock")
        return self.submit_future(prompt).result(timeout)

    async def asubmit(self, prompt: str) -> float:
        """``await``-able :meth:`submit`; the event loop is never blocked."""
        return await asyncio.wrap_future(self.submit_future(prompt))

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish those already queued, join the worker.

        Idempotent. Requests the worker could not reach before *timeout* fail with
        :class:`BatcherClosedError`.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        if not self._worker.is_alive():
            self._fail_pending()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return (
            f"MicroBatcher(max_batch={self.max_batch}, max_wait_ms={1000 * self.max_wait_s:g}, "
            f"closed={self._closed}, batches={self.stats.batches}, "
            f"requests={self.stats.requests})"
        )

    # ------------------------------------------------------------------ worker
    def _fail_pending(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(BatcherClosedError("the MicroBatcher was closed"))

    def _collect(self, first: tuple[str, Future[float]]) -> tuple[list[Any], bool]:
        """The batch that starts with *first*, and whether the stop marker was seen."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, batch: list[tuple[str, Future[float]]]) -> None:
        # Skip requests cancelled while queued (e.g. a cancelled asubmit task).
        live = [(p, f) for p, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        prompts = [p for p, _ in live]
        self.stats.requests += len(live)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        if len(self.stats.batch_sizes) < 10_000:
            self.stats.batch_sizes.append(len(live))
        try:
            results = list(self.fn(prompts))
            if len(results) != len(prompts):
                raise ValueError(
                    f"MicroBatcher fn returned {len(results)} results for {len(prompts)} prompts"
                )
        except BaseException as exc:  # every waiter must hear about it, whatever it is
            self.stats.errors += 1
            for _, fut in live:
                fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), value in zip(live, results, strict=True):
            fut.set_result(value)

    def _loop(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch, stop = self._collect(item)
            self._run_batch(batch)
        # Drain what was queued before close() (never more than max_batch per call).
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is not _STOP:
                    batch.append(nxt)
            self._run_batch(batch)


class BatchingScorer:
    """A :class:`~ssd_guard.scoring.base.RiskScorer` whose single-prompt
    ``score_prompts`` calls, made concurrently from threads (or from the guard's async
    path, which scores on worker threads), are coalesced by a :class:`MicroBatcher` into
    one batched truncated prefill::

        guard = Guard(BatchingScorer(SSDScorer.load("bundled")), "policies/default.yaml")

    Calls with several prompts go straight to the wrapped scorer (they are a batch
    already), as do answer checks; so does any call made while a
    :class:`~ssd_guard.local.GuardedLocalModel` serves hidden states from its own
    prefill (that state is free; batching it would only add latency). Scores equal
    the wrapped scorer's. Everything else (``fingerprint``, ``model_id``, ``layer``,
    ``calibration``, ``format_prompt``...) is the wrapped scorer's.
    """

    def __init__(self, scorer: Any, *, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        self.scorer = scorer
        self.name = str(getattr(scorer, "name", type(scorer).__name__))
        self.batcher = MicroBatcher(
            lambda prompts: scorer.score_prompts(prompts),
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            name=f"ssd-guard-batcher-{self.name}",
        )

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on self: delegate to the wrapped scorer.
        if name == "scorer":
            raise AttributeError(name)
        return getattr(self.scorer, name)

    def _provider_active(self) -> bool:
        active = _HIDDEN_PROVIDER.get()
        return active is not None and active[0] is self.scorer

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        if len(prompts) != 1 or self.batcher.closed or self._provider_active():
            return list(self.scorer.score_prompts(prompts))
        return [self.batcher.submit(prompts[0])]

    def score_answers(
        self, prompts: Sequence[str], answers: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[float] | list[list[float]]:
        return self.scorer.score_answers(prompts, answers)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Finish the queued requests and stop the worker (later calls run unbatched)."""
        self.batcher.close()

    def __enter__(self) -> BatchingScorer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BatchingScorer({self.scorer!r}, {self.batcher!r})"
