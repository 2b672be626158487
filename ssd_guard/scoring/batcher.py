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
from typing import Any, Generic, Self, TypeVar

import torch

from ssd_guard.scoring.callstats import CallStats, takes_stats

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

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Coalesce concurrent requests into batched calls of ``fn``.

    Args:
        fn: ``fn(prompts) -> list[T]``, one result per prompt, same order (e.g.
            ``SSDScorer.score_prompts``: floats). Called only from the worker thread.
        max_batch: most prompts per call of ``fn``.
        max_wait_ms: how long the worker waits after the first request of a batch for
            more to arrive (``0``: take only what is already queued).
        name: the worker thread's name.
    """

    def __init__(
        self,
        fn: Callable[[list[str]], Sequence[T]],
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

    def submit_future(self, prompt: str) -> Future[T]:
        """Queue *prompt*; the returned future resolves to its result."""
        fut: Future[T] = Future()
        with self._lock:  # no request can slip in behind the stop marker
            if self._closed:
                raise BatcherClosedError("this MicroBatcher is closed")
            self._queue.put((prompt, fut))
        return fut

    def submit(self, prompt: str, timeout: float | None = None) -> T:
        """Score *prompt* in the next batch; blocks until it is done (re-raises ``fn``'s
        exception)."""
        if threading.current_thread() is self._worker:
            raise RuntimeError("MicroBatcher.submit called from its own fn: this would deadlock")
        return self.submit_future(prompt).result(timeout)

    async def asubmit(self, prompt: str) -> T:
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
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

    def _collect(self, first: tuple[str, Future[T]]) -> tuple[list[Any], bool]:
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

    def _run_batch(self, batch: list[tuple[str, Future[T]]]) -> None:
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
    batched truncated prefills::

        guard = Guard(BatchingScorer(SSDScorer.load("bundled")), "policies/default.yaml")

    Over an :class:`~ssd_guard.scoring.ssd.SSDScorer` what is batched is the prefill
    itself: a guarded call's statistics (``stats=``, a
    :class:`~ssd_guard.scoring.callstats.CallStats`) get the prompt's state from the
    batch, so the call's later checks reuse it and the call still runs one prefill
    (counted in ``stats.forwards``; a prompt cut to ``max_tokens`` sets
    ``stats.truncated``). A call whose statistics already have a ``hidden_provider`` (a
    :class:`~ssd_guard.local.GuardedLocalModel` hands over its own prefill's state) goes
    straight to the wrapped scorer: that state is free. Calls with several prompts are a
    batch already and skip the queue. Answer checks, ``fingerprint``, ``model_id``,
    ``layer``, ``calibration``, ``format_prompt``... are the wrapped scorer's.

    **Scores equal the unbatched ones** (``bucket_by_length=True``, the default): a
    batch is split by token length (of the formatted prompt, as the wrapped scorer's
    ``encoder`` tokenizes and cuts it), and each length runs as one unpadded prefill, so
    a prompt's score never depends on the traffic it was batched with. Padding is what
    made them differ: on 48 TriviaQA prompts in bf16, a left-padded batch moved the
    bundled student's entropy by up to 0.42 nats (mean 0.09; right padding with a
    last-token gather: up to 0.32), a same-length batch by at most 1e-5. The price is
    smaller batches when concurrent prompts differ in length: 96 requests from 8 threads
    on a shared 2-core CPU ran as 80 prefills instead of 14, at 22.1 prompts/s against
    23.9 padded and 21.9 one at a time (``benchmarks/batcher_exactness.py``,
    ``benchmarks/results/batcher-exactness.json``); a GPU, where padded batches gain
    more, was not measured. ``bucket_by_length=False`` pads the whole batch into one
    prefill, for throughput, with scores off by the amounts above.

    A scorer without a tokenizing ``encoder`` and ``stats=`` (a test double, a remote
    scorer) has its ``score_prompts`` batched as a whole instead, split by length when it
    has an encoder.
    """

    def __init__(
        self,
        scorer: Any,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        bucket_by_length: bool = True,
    ) -> None:
        self.scorer = scorer
        self.name = str(getattr(scorer, "name", type(scorer).__name__))
        self.bucket_by_length = bucket_by_length
        #: the prefill is batched (an SSDScorer-like scorer), else whole score_prompts calls
        self.batches_prefills = _encodes(scorer) and takes_stats(scorer.score_prompts)
        name = f"ssd-guard-batcher-{self.name}"
        self.batcher: MicroBatcher[Any]
        if self.batches_prefills:
            self.batcher = MicroBatcher(
                self._encode_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name
            )
        else:
            self.batcher = MicroBatcher(
                self._score_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, name=name
            )

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on self: delegate to the wrapped scorer.
        if name == "scorer":
            raise AttributeError(name)
        return getattr(self.scorer, name)

    # ------------------------------------------------------------------ scoring
    def score_prompts(
        self, prompts: Sequence[str], *, stats: CallStats | None = None
    ) -> list[float]:
        """Pre-generation risk per prompt, as the wrapped scorer's, batched with other
        callers' prompts (see the class doc)."""
        if isinstance(prompts, str | bytes) or not all(isinstance(p, str) for p in prompts):
            # Bad input gets the wrapped scorer's own error, and only this caller sees it.
            return list(self.scorer.score_prompts(prompts))
        if not self.batches_prefills:
            if len(prompts) != 1 or self.batcher.closed:
                return self._score_batch(list(prompts))
            return [self.batcher.submit(prompts[0])]
        if stats is None:
            stats = CallStats()  # this call's own: its prefill is batched all the same
        if stats.hidden_provider is None:
            stats.hidden_provider = self._provider(stats)
        return list(self.scorer.score_prompts(prompts, stats=stats))

    def score_answers(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        *,
        stats: CallStats | None = None,
        **kw: Any,
    ) -> list[float] | list[list[float]]:
        """The wrapped scorer's answer check (not queued; with the call's ``stats`` it
        reuses the prompt state the call already has)."""
        if stats is not None and takes_stats(self.scorer.score_answers):
            kw["stats"] = stats
        return self.scorer.score_answers(prompts, answers, **kw)  # type: ignore[no-any-return]

    def _provider(self, stats: CallStats) -> Callable[[list[str]], torch.Tensor]:
        """The ``hidden_provider`` that gets a call's states from the batched prefills."""
        worker = self.batcher._worker

        def provide(texts: list[str]) -> torch.Tensor:
            if len(texts) == 1 and not self.batcher.closed:
                if threading.current_thread() is worker:  # never wait on our own queue
                    rows = self._encode_batch(texts)
                else:
                    rows = [self.batcher.submit(texts[0])]
                prefills = 1  # one prefill, shared with the batch's other callers
            else:
                groups = self._groups(texts)
                rows = self._encode_groups(texts, groups)
                size = max(int(getattr(self.scorer.encoder, "batch_size", 1)), 1)
                prefills = sum(-(-len(g) // size) for g in groups)
            stats.forwards += prefills
            if any(cut for _, cut in rows):
                stats.truncated = True
            return torch.cat([row for row, _ in rows])

        return provide

    def _groups(self, texts: list[str]) -> list[list[int]]:
        """Indices of *texts* by token length (one group: ``bucket_by_length=False``)."""
        lengths = _lengths_of(self.scorer, texts) if self.bucket_by_length else None
        if lengths is None or len(set(lengths)) <= 1:
            return [list(range(len(texts)))]
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_length.setdefault(n, []).append(i)
        return list(by_length.values())

    def _encode_groups(
        self, texts: list[str], groups: list[list[int]]
    ) -> list[tuple[torch.Tensor, bool]]:
        out: list[tuple[torch.Tensor, bool]] = [(torch.empty(0), False)] * len(texts)
        for rows in groups:
            cut: list[bool] = []
            h = self.scorer.encoder.encode([texts[i] for i in rows], cut=cut)
            for k, i in enumerate(rows):
                out[i] = (h[k : k + 1].clone(), bool(cut[k]) if k < len(cut) else False)
        return out

    def _encode_batch(self, texts: list[str]) -> list[tuple[torch.Tensor, bool]]:
        """The prefill batcher's ``fn``: features and cut flags of formatted prompts, one
        truncated prefill per token length (or one padded prefill for them all)."""
        return self._encode_groups(texts, self._groups(texts))

    def _score_batch(self, prompts: list[str]) -> list[float]:
        """The batcher's ``fn`` for other scorers: one ``score_prompts`` call per token
        length when the scorer has an encoder, else one for the whole batch."""
        lengths = None
        if len(prompts) > 1 and self.bucket_by_length:
            lengths = _token_lengths(self.scorer, prompts)
        if lengths is None or len(set(lengths)) == 1:
            return [float(v) for v in self.scorer.score_prompts(prompts)]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        out = [0.0] * len(prompts)
        for rows in groups.values():
            values = self.scorer.score_prompts([prompts[i] for i in rows])
            for i, v in zip(rows, values, strict=True):
                out[i] = float(v)
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Finish the queued requests and stop the worker (later calls run unbatched)."""
        self.batcher.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BatchingScorer({self.scorer!r}, {self.batcher!r})"


def _encodes(scorer: Any) -> bool:
    """Whether *scorer* runs its own prefill through a tokenizing ``encoder``."""
    encoder = getattr(scorer, "encoder", None)
    return (
        getattr(encoder, "tokenizer", None) is not None
        and callable(getattr(encoder, "encode", None))
        and callable(getattr(scorer, "format_prompt", None))
    )


def _lengths_of(scorer: Any, texts: list[str]) -> list[int] | None:
    """Token counts of already formatted prompts, cut to the encoder's ``max_tokens``."""
    encoder = getattr(scorer, "encoder", None)
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        return None
    ids = tokenizer(list(texts))["input_ids"]
    cap = getattr(encoder, "max_tokens", None)
    return [min(len(row), cap) if isinstance(cap, int) else len(row) for row in ids]


def _token_lengths(scorer: Any, prompts: list[str]) -> list[int] | None:
    """How many tokens each prompt has once *scorer* formats it and its ``encoder``
    tokenizes (and cuts) it; ``None`` for a scorer without such an encoder."""
    if not _encodes(scorer):
        return None
    return _lengths_of(scorer, [scorer.format_prompt(p) for p in prompts])
