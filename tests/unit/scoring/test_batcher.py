"""MicroBatcher: concurrent requests are coalesced into batched calls, results unchanged."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ssd_guard.scoring.batcher import BatcherClosedError, MicroBatcher


def score_one(prompt: str) -> float:
    return float(len(prompt)) + sum(map(ord, prompt)) / 1000.0


class Recorder:
    """A batch function that records every call (and can be slowed down or made to fail)."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, prompts: list[str]) -> list[float]:
        with self.lock:
            self.calls.append(list(prompts))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in prompts:
            raise ValueError(f"boom on {self.fail_on}")
        return [score_one(p) for p in prompts]


PROMPTS = [f"prompt number {i} {'x' * (i % 7)}" for i in range(64)]


def test_threads_get_exactly_the_unbatched_results_and_batches_form() -> None:
    fn = Recorder(delay_s=0.005)
    start = threading.Barrier(16)

    def worker(chunk: list[str]) -> list[tuple[str, float]]:
        start.wait()
        return [(p, batcher.submit(p)) for p in chunk]

    with MicroBatcher(fn, max_batch=8, max_wait_ms=5.0) as batcher:
        chunks = [PROMPTS[i::16] for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            got = [pair for res in pool.map(worker, chunks) for pair in res]
    assert len(got) == len(PROMPTS)
    for prompt, value in got:
        assert value == score_one(prompt)
    flat = [p for call in fn.calls for p in call]
    assert sorted(flat) == sorted(PROMPTS)  # every request exactly once
    assert len(fn.calls) < len(PROMPTS)  # batches actually formed
    assert max(len(c) for c in fn.calls) <= 8
    assert batcher.stats.requests == len(PROMPTS)
    assert batcher.stats.batches == len(fn.calls)
    assert batcher.stats.largest_batch > 1


def test_single_request_is_not_delayed_beyond_max_wait() -> None:
    fn = Recorder()
    with MicroBatcher(fn, max_batch=32, max_wait_ms=1.0) as batcher:
        t0 = time.perf_counter()
        assert batcher.submit("alone") == score_one("alone")
        assert time.perf_counter() - t0 < 1.0
    assert fn.calls == [["alone"]]


async def test_asyncio_path() -> None:
    fn = Recorder(delay_s=0.002)
    async with MicroBatcher(fn, max_batch=16, max_wait_ms=20.0) as batcher:
        values = await asyncio.gather(*(batcher.asubmit(p) for p in PROMPTS[:32]))
    assert values == [score_one(p) for p in PROMPTS[:32]]
    assert len(fn.calls) < 32
    assert all(len(c) <= 16 for c in fn.calls)


def test_error_reaches_every_waiter_of_the_batch_and_later_batches_work() -> None:
    fn = Recorder(fail_on="bad")
    with MicroBatcher(fn, max_batch=8, max_wait_ms=50.0) as batcher:
        futs = [batcher.submit_future(p) for p in ("a", "bad", "c")]
        for fut in futs:
            with pytest.raises(ValueError, match="boom on bad"):
                fut.result(timeout=5)
        assert batcher.submit("fine") == score_one("fine")
        assert batcher.stats.errors == 1
    assert fn.calls[0] == ["a", "bad", "c"]


async def test_error_propagates_to_async_waiters() -> None:
    fn = Recorder(fail_on="bad")
    with MicroBatcher(fn, max_batch=8, max_wait_ms=50.0) as batcher:
        results = await asyncio.gather(
            batcher.asubmit("ok"), batcher.asubmit("bad"), return_exceptions=True
        )
    assert all(isinstance(r, ValueError) for r in results)


def test_wrong_result_count_is_an_error_for_everyone() -> None:
    with MicroBatcher(lambda ps: [0.0], max_batch=4, max_wait_ms=50.0) as batcher:
        futs = [batcher.submit_future(p) for p in ("a", "b")]
        for fut in futs:
            with pytest.raises(ValueError, match="1 results for 2 prompts"):
                fut.result(timeout=5)


def test_close_finishes_queued_work_then_refuses() -> None:
    fn = Recorder(delay_s=0.02)
    batcher = MicroBatcher(fn, max_batch=2, max_wait_ms=0.0)
    futs = [batcher.submit_future(p) for p in PROMPTS[:6]]
    batcher.close()
    assert [f.result(timeout=5) for f in futs] == [score_one(p) for p in PROMPTS[:6]]
    assert batcher.closed and not batcher._worker.is_alive()
    with pytest.raises(BatcherClosedError):
        batcher.submit("late")
    batcher.close()  # idempotent


def test_fn_calling_submit_is_refused_not_deadlocked() -> None:
    holder: dict[str, MicroBatcher] = {}

    def reentrant(prompts: list[str]) -> list[float]:
        return [holder["b"].submit(p) for p in prompts]

    with MicroBatcher(reentrant, max_wait_ms=0.0) as batcher:
        holder["b"] = batcher
        with pytest.raises(RuntimeError, match="deadlock"):
            batcher.submit("x", timeout=5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(score_one, max_batch=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_wait_ms"):
        MicroBatcher(score_one, max_wait_ms=-1)  # type: ignore[arg-type]
