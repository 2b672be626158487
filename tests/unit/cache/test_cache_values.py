"""Every cached value is validated, and values are signed
with an HMAC key from the environment; forged, non-finite or mistyped values are misses
plus a structured event. Runs against MemoryCache and a real redis-server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from ssd_guard.cache import (
    HMAC_KEY_ENV,
    MemoryCache,
    RedisCache,
    cache_from_config,
    collect_errors,
    make_key,
    report_error,
)
from ssd_guard.policy import CacheConfig

AnyCache = MemoryCache | RedisCache
KEY = make_key("t", student_fingerprint="fp", model_id="m", layer=3, prompt="What is X?")
OTHER = make_key("t", student_fingerprint="fp", model_id="m", layer=3, prompt="What is Y?")

FORGED = [
    ('{"v":1,"value":{"entropy":NaN}}', "not finite"),
    ('{"v":1,"value":{"entropy":-Infinity}}', "not finite"),
    ('{"v":1,"value":{"entropy":Infinity}}', "not finite"),
    ('{"v":1,"value":{"entropy":1e999}}', "not finite"),
    ('{"v":1,"value":{"entropy":true}}', "must be a number, got bool"),
    ('{"v":1,"value":{"entropy":"0.1"}}', "must be a number, got str"),
    ('{"v":1,"value":{"entropy":null}}', "must be a number, got NoneType"),
    ('{"v":1,"value":{"entropy":[0.1]}}', "must be a number, got list"),
    ('{"v":1,"value":{"entropy":{"x":1}}}', "must be a number, got dict"),
    ("[" * 100_000 + "]" * 100_000, "undecodable"),
]


@pytest.fixture(params=["memory", "redis"])
def make_cache(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., AnyCache]]:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    created: list[AnyCache] = []

    def make(**kwargs: Any) -> AnyCache:
        cache: AnyCache
        if request.param == "memory":
            cache = MemoryCache(namespace="t", **kwargs)
        else:
            url = request.getfixturevalue("redis_url")
            cache = RedisCache(url, namespace="t", timeout_s=0.5, **kwargs)
        created.append(cache)
        return cache

    yield make
    for cache in created:
        cache.close()


def _invalid(logs: list[Any], event: str = "cache.value.invalid") -> list[Any]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.parametrize(("raw", "reason"), FORGED)
def test_forged_or_non_finite_values_are_logged_misses(
    make_cache: Callable[..., AnyCache], raw: str, reason: str
) -> None:
    cache = make_cache()
    cache._set_raw(KEY, raw)
    with capture_logs() as logs:
        assert cache.get(KEY) is None
        assert cache.get_many([KEY, OTHER]) == [None, None]
    events = _invalid(logs)
    assert len(events) == 2
    assert reason in events[0]["reason"] and events[0]["key"] == KEY
    assert cache.healthy  # a bad value is not an outage


async def test_forged_values_are_misses_async(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    cache._set_raw(KEY, '{"v":1,"value":{"entropy":NaN}}')
    with capture_logs() as logs:
        assert await cache.aget(KEY) is None
        assert await cache.aget_many([KEY]) == [None]
    assert len(_invalid(logs)) == 2


def test_writes_refuse_what_reads_would_refuse(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    for bad in ({"entropy": float("nan")}, {"entropy": float("-inf")}, {"entropy": 10**400}):
        with pytest.raises(ValueError, match="not finite"):
            cache.set(KEY, bad)
    bad_types: list[Any] = [{"entropy": True}, {"entropy": "1"}, {"entropy": None}, {1: 1.0}]
    for bad_type in bad_types:
        with pytest.raises(TypeError):
            cache.set(KEY, bad_type)
    with pytest.raises(ValueError, match="not finite"):
        cache.set_many({KEY: {"loglik": float("nan")}})
    assert cache.get(KEY) is None  # nothing was written
    cache.set(KEY, {"entropy": 2, "loglik": -1.5})
    assert cache.get(KEY) == {"entropy": 2.0, "loglik": -1.5}


# ---------------------------------------------------------------------------- signatures
def test_signed_values_round_trip_and_unsigned_ones_are_misses(
    make_cache: Callable[..., AnyCache],
) -> None:
    cache = make_cache(hmac_key="s3cret")
    cache.set(KEY, {"entropy": 2.9})
    assert cache.get(KEY) == {"entropy": 2.9}
    cache.set_many({OTHER: {"entropy": 0.5}})
    assert cache.get_many([KEY, OTHER]) == [{"entropy": 2.9}, {"entropy": 0.5}]

    cases = {
        "missing signature": '{"v":1,"value":{"entropy":0.1}}',
        "signature mismatch": '{"v":1,"value":{"entropy":0.1},"sig":"' + "0" * 64 + '"}',
    }
    for reason, raw in cases.items():
        cache._set_raw(KEY, raw)
        with capture_logs() as logs:
            assert cache.get(KEY) is None
        (event,) = _invalid(logs, "cache.value.bad_signature")
        assert event["reason"] == reason and event["key"] == KEY


def test_signature_binds_value_and_key(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache(hmac_key=b"s3cret")
    cache.set(KEY, {"entropy": 2.9})
    cache.set(OTHER, {"entropy": 0.1})
    signed_low = _raw_of(cache, OTHER)
    # a valid signed value copied under another key (a low score onto a risky prompt)
    cache._set_raw(KEY, signed_low)
    with capture_logs() as logs:
        assert cache.get(KEY) is None
    assert _invalid(logs, "cache.value.bad_signature")[0]["reason"] == "signature mismatch"
    # the value edited, the signature kept
    envelope = json.loads(signed_low)
    envelope["value"]["entropy"] = 0.0
    cache._set_raw(OTHER, json.dumps(envelope))
    assert cache.get(OTHER) is None
    # another key reads nothing it did not sign
    cache.set(KEY, {"entropy": 2.9})
    raw = _raw_of(cache, KEY)
    other_cache = make_cache(hmac_key="another-secret")
    other_cache._set_raw(KEY, raw)
    assert other_cache.get(KEY) is None


def _raw_of(cache: AnyCache, key: str) -> str:
    if isinstance(cache, MemoryCache):
        return cache._data[key][1]
    value = cache._client.get(key)
    assert isinstance(value, bytes)
    return value.decode()


def test_redis_takes_the_hmac_key_from_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "from-env")
    cache = cache_from_config(CacheConfig(url=redis_url, namespace="t"))
    assert isinstance(cache, RedisCache) and cache.signed and "signed=True" in repr(cache)
    cache.set(KEY, {"entropy": 1.25})
    raw = redis.Redis.from_url(redis_url)
    stored = json.loads(raw.get(KEY) or b"null")
    assert set(stored) == {"v", "value", "sig"} and len(stored["sig"]) == 64
    assert cache.get(KEY) == {"entropy": 1.25}
    raw.set(KEY, json.dumps({"v": 1, "value": {"entropy": 0.0}}))  # forged, unsigned
    with capture_logs() as logs:
        assert cache.get(KEY) is None
    assert _invalid(logs, "cache.value.bad_signature")
    raw.close()
    cache.close()
    monkeypatch.setenv(HMAC_KEY_ENV, "")  # empty: unsigned
    unsigned = RedisCache(redis_url, namespace="t")
    assert not unsigned.signed
    unsigned.close()
    assert not MemoryCache().signed and MemoryCache(hmac_key="k").signed


def test_memory_cache_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "from-env")
    cache = MemoryCache()
    assert not cache.signed
    cache._set_raw(KEY, '{"v":1,"value":{"entropy":0.5}}')
    assert cache.get(KEY) == {"entropy": 0.5}  # in-process: not signed unless asked


# ---------------------------------------------------------------------------- error report
def test_collect_errors_sees_only_its_own_block() -> None:
    report_error("ignored")  # no collector: a no-op
    with collect_errors() as outer:
        report_error("connection")
        with collect_errors() as inner:
            report_error("timeout")
        report_error("circuit-open")
    assert outer == ["connection", "circuit-open"] and inner == ["timeout"]
