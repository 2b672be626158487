"""Leases (single flight) on the memory cache, and the guard's lookup using them."""

from __future__ import annotations

import threading

import pytest
from helpers.guard import make_policy, make_scorer

from ssd_guard.cache import MemoryCache
from ssd_guard.cache.leases import LeasingCache
from ssd_guard.guard import Guard


def test_claim_poll_release_and_expiry() -> None:
    now = [0.0]
    cache = MemoryCache(clock=lambda: now[0])
    assert isinstance(cache, LeasingCache)
    assert cache.claim_many(["a", "b"], 10) == [True, True]
    assert cache.claim_many(["a", "c"], 10) == [False, True]
    assert cache.poll_many(["a"]) == [(None, True)]
    cache.set("a", {"entropy": 1.5})
    cache.release_many(["a"])
    assert cache.poll_many(["a"]) == [({"entropy": 1.5}, False)]
    now[0] = 11.0  # b's holder never released it: it expires
    assert cache.poll_many(["b"]) == [(None, False)]
    assert cache.claim_many(["b"], 10) == [True]
    with pytest.raises(ValueError, match="ttl_s"):
        cache.claim_many(["x"], 0)


def test_threads_sharing_a_cache_score_each_prompt_once() -> None:
    scorer = make_scorer()
    cache = MemoryCache()
    guard = Guard(scorer, make_policy(), cache=cache)
    calls: list[str] = []
    inner = scorer.score_prompts
    gate = threading.Barrier(4)

    def counting(prompts, **kw):  # type: ignore[no-untyped-def]
        calls.extend(prompts)
        return inner(prompts, **kw)

    scorer.score_prompts = counting  # type: ignore[method-assign]
    prompts = [f"question {i}?" for i in range(10)]
    results: list[list[float]] = []

    def work() -> None:
        gate.wait()
        results.append([guard.check_prompt(p).scores["entropy"] for p in prompts])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == sorted(prompts)  # each scored once, by one of the threads
    assert all(r == results[0] for r in results)
