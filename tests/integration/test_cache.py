"""Score cache: one suite run against MemoryCache and a real redis-server, plus Redis
failure modes (killed / restarted / slow server)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from ssd_guard.cache import (
    HMAC_KEY_ENV,
    MemoryCache,
    RedisCache,
    ScoreCache,
    cache_from_config,
    make_key,
    normalise_text,
)
from ssd_guard.errors import CacheUnavailableError, SSDGuardError
from ssd_guard.policy import CacheConfig

AnyCache = MemoryCache | RedisCache


def _key(i: int | str, ns: str = "t") -> str:
    return make_key(ns, student_fingerprint="fp", model_id="m", layer=3, prompt=f"prompt {i}")


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest) -> Iterator[Callable[..., AnyCache]]:
    created: list[AnyCache] = []

    def make(**kwargs: Any) -> AnyCache:
        cache: AnyCache
        if request.param == "memory":
            kwargs.pop("timeout_s", None)
            cache = MemoryCache(**kwargs)
        else:
            url = request.getfixturevalue("redis_url")
            kwargs.pop("max_entries", None)
            if kwargs.get("ttl_s", 1) is None:
                kwargs.pop("ttl_s")
            cache = RedisCache(url, **{"timeout_s": 0.5, **kwargs})
        created.append(cache)
        return cache

    yield make
    for cache in created:
        cache.close()


# ---------------------------------------------------------------------------- keys
def test_make_key_shape_and_exact_text() -> None:
    k = make_key("ns", student_fingerprint="abc", model_id="m", layer=4, prompt="Hello world")
    ns, digest = k.split(":")
    assert ns == "ns" and len(digest) == 64 and int(digest, 16) >= 0
    same = make_key("ns", student_fingerprint="abc", model_id="m", layer=4, prompt="Hello world")
    assert k == same
    # the scorer sees the exact text, so the key does too
    for variant in ("Hello  world", " Hello world", "Hello world\n", "Hello\tworld"):
        other = make_key("ns", student_fingerprint="abc", model_id="m", layer=4, prompt=variant)
        assert other != k, variant
    nfd = make_key("ns", student_fingerprint="abc", model_id="m", layer=4, prompt="Cafe\u0301")
    nfc = make_key("ns", student_fingerprint="abc", model_id="m", layer=4, prompt="Caf\u00e9")
    assert nfd != nfc
    assert normalise_text("  a\t\tb \n c ") == "a b c"
    assert normalise_text("Cafe\u0301") == "Caf\u00e9"  # NFC


def test_make_key_separates_everything_it_depends_on() -> None:
    base: dict[str, Any] = {
        "student_fingerprint": "abc",
        "model_id": "m",
        "layer": 4,
        "prompt": "Hello world",
    }
    keys = {
        make_key("ns", **base),
        make_key("ns2", **base),
        make_key("ns", **{**base, "prompt": "hello world"}),  # case is kept
        make_key("ns", **{**base, "student_fingerprint": "abd"}),
        make_key("ns", **{**base, "model_id": "m2"}),
        make_key("ns", **{**base, "layer": 5}),
        make_key("ns", **base, answer=""),
        make_key("ns", **base, answer="Paris"),
        make_key("ns", **base, answer="Paris", extra={"k": 1}),
    }
    assert len(keys) == 9
    assert make_key("ns", **base, answer=" Paris ") != make_key("ns", **base, answer="Paris")


# ---------------------------------------------------------------------------- shared suite
def test_protocol(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    assert isinstance(cache, ScoreCache)
    assert cache.healthy
    assert cache.key(
        student_fingerprint="fp", model_id="m", layer=3, prompt="prompt 1"
    ) == make_key(
        cache.namespace, student_fingerprint="fp", model_id="m", layer=3, prompt="prompt 1"
    )


def test_miss_then_hit(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    k = _key(1)
    assert cache.get(k) is None
    cache.set(k, {"entropy": 2.5, "n": 3})
    got = cache.get(k)
    assert got == {"entropy": 2.5, "n": 3.0}
    assert got is not None
    got["entropy"] = 99.0  # callers get a copy
    assert cache.get(k) == {"entropy": 2.5, "n": 3.0}
    cache.set(k, {"entropy": 1.0})
    assert cache.get(k) == {"entropy": 1.0}


def test_float_values_round_trip_exactly(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    values = {"entropy": 0.1 + 0.2, "loglik": -1234.567891234, "tiny": 5e-324}
    cache.set(_key("f"), values)
    assert cache.get(_key("f")) == values


def test_rejects_non_mapping_values(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.set(_key(1), [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a number"):
        cache.set(_key(1), {"tag": "x"})
    with pytest.raises(TypeError, match="must be a number"):
        cache.set(_key(1), {"flag": True})
    with pytest.raises(ValueError, match="not finite"):
        cache.set(_key(1), {"entropy": float("nan")})
    with pytest.raises(ValueError, match="ttl_s"):
        cache.set(_key(1), {"a": 1}, ttl_s=0)


def test_ttl_expiry(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache(ttl_s=60)
    cache.set(_key("short"), {"v": 1}, ttl_s=1)
    cache.set(_key("long"), {"v": 2})
    cache.set_many({_key("batch"): {"v": 3}}, ttl_s=1)
    assert cache.get(_key("short")) == {"v": 1}
    time.sleep(1.15)
    assert cache.get(_key("short")) is None
    assert cache.get(_key("batch")) is None
    assert cache.get(_key("long")) == {"v": 2}


def test_default_ttl_from_constructor(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache(ttl_s=1)
    cache.set(_key("d"), {"v": 1})
    assert cache.get(_key("d")) == {"v": 1}
    time.sleep(1.15)
    assert cache.get(_key("d")) is None


def test_get_many_set_many(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    keys = [_key(i) for i in range(50)]
    cache.set_many({k: {"i": i} for i, k in enumerate(keys) if i % 2 == 0})
    got = cache.get_many(keys)
    assert got == [({"i": i} if i % 2 == 0 else None) for i in range(50)]
    assert cache.get_many([]) == []
    cache.set_many([])
    cache.set_many([(keys[1], {"i": 1.5})])  # iterable of pairs too
    assert cache.get_many([keys[1], keys[0]]) == [{"i": 1.5}, {"i": 0}]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps({"v": 2, "value": {"entropy": 1.0}}), "schema version 2"),
        (json.dumps({"entropy": 1.0}), "schema version None"),
        (json.dumps({"v": 1, "value": [1, 2]}), "value not a mapping"),
        ("{not json", "undecodable"),
        ("[1, 2]", "schema version None"),
    ],
)
def test_bad_or_other_version_value_is_a_logged_miss(
    make_cache: Callable[..., AnyCache], raw: str, reason: str
) -> None:
    cache = make_cache()
    k = _key("bad")
    cache._set_raw(k, raw)
    with capture_logs() as logs:
        assert cache.get(k) is None
        assert cache.get_many([k, _key("other")]) == [None, None]
    invalid = [e for e in logs if e["event"] == "cache.value.invalid"]
    assert len(invalid) == 2
    assert reason in invalid[0]["reason"] and invalid[0]["key"] == k
    assert cache.healthy
    cache.set(k, {"entropy": 1.0})  # a fresh write replaces the bad entry
    assert cache.get(k) == {"entropy": 1.0}


def test_concurrent_threads(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    errors: list[BaseException] = []
    shared = _key("shared")

    def worker(t: int) -> None:
        try:
            for i in range(60):
                k = _key(f"{t}-{i}")
                cache.set(k, {"t": t, "i": i})
                assert cache.get(k) == {"t": t, "i": i}
                cache.set(shared, {"t": t})
                got = cache.get(shared)
                assert got is not None and set(got) == {"t"}
            assert cache.get_many([_key(f"{t}-{i}") for i in range(60)]) == [
                {"t": t, "i": i} for i in range(60)
            ]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    final = cache.get(shared)
    assert final is not None and final["t"] in range(8)


async def test_concurrent_asyncio(make_cache: Callable[..., AnyCache]) -> None:
    cache = make_cache()
    keys = [_key(f"a{i}") for i in range(100)]
    await asyncio.gather(*(cache.aset(k, {"i": i}) for i, k in enumerate(keys)))
    got = await asyncio.gather(*(cache.aget(k) for k in keys))
    assert got == [{"i": i} for i in range(100)]
    await cache.aset_many({k: {"i": -i} for i, k in enumerate(keys[:10])}, ttl_s=30)
    assert await cache.aget_many(keys[:12]) == [{"i": -i} for i in range(10)] + [
        {"i": 10},
        {"i": 11},
    ]
    assert await cache.aget_many([]) == []
    assert await cache.aget(_key("nothing")) is None
    assert cache.get(keys[50]) == {"i": 50}  # sync and async see the same data
    await cache.aclose()


def test_cache_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "k")  # fail_mode="closed" needs a key
    mem = cache_from_config(CacheConfig(max_entries=5, ttl_s=7, namespace="x"))
    assert isinstance(mem, MemoryCache)
    assert (mem.max_entries, mem.ttl_s, mem.namespace) == (5, 7, "x")
    cfg = CacheConfig(url="redis://127.0.0.1:1/0", fail_mode="closed", timeout_s=0.2, retries=1)
    red = cache_from_config(cfg)
    assert isinstance(red, RedisCache)
    assert (red.fail_mode, red.timeout_s, red.retries, red.ttl_s) == ("closed", 0.2, 1, 86400)
    red.close()


# ---------------------------------------------------------------------------- memory only
def test_memory_lru_eviction() -> None:
    cache = MemoryCache(max_entries=3)
    for i in range(3):
        cache.set(_key(i), {"i": i})
    assert cache.get(_key(0)) == {"i": 0}  # 0 becomes most recent
    cache.set(_key(3), {"i": 3})  # evicts 1
    assert cache.get(_key(1)) is None
    assert [cache.get(_key(i)) for i in (0, 2, 3)] == [{"i": 0}, {"i": 2}, {"i": 3}]
    assert len(cache) == 3


def test_memory_ttl_with_injected_clock() -> None:
    now = [100.0]
    cache = MemoryCache(ttl_s=10, clock=lambda: now[0])
    cache.set(_key(1), {"a": 1})
    cache.set(_key(2), {"a": 2}, ttl_s=30)
    now[0] = 109.9
    assert cache.get(_key(1)) == {"a": 1}
    now[0] = 110.0
    assert cache.get(_key(1)) is None and len(cache) == 1
    assert cache.get(_key(2)) == {"a": 2}
    now[0] = 131.0
    assert cache.get_many([_key(2)]) == [None]


def test_memory_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        MemoryCache(max_entries=0)
    with pytest.raises(ValueError):
        MemoryCache(ttl_s=-1)


# ---------------------------------------------------------------------------- redis only
def _raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def test_redis_stores_plain_json_strings_with_ttl(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_s=100, timeout_s=0.5, namespace="t")
    k = _key(1)
    cache.set(k, {"entropy": 2.0})
    raw = _raw(redis_url)
    assert raw.type(k) == b"string"
    assert json.loads(raw.get(k) or "null") == {"v": 1, "value": {"entropy": 2.0}}
    assert 95 <= raw.ttl(k) <= 100
    cache.set(k, {"entropy": 2.0}, ttl_s=1.5)  # fractional TTL -> PX
    assert 1000 <= raw.pttl(k) <= 1500
    raw.set("other-app:key", "kept")
    cache.clear()
    assert raw.exists(k) == 0
    assert raw.get("other-app:key") == b"kept"
    raw.close()
    cache.close()


def test_redis_batches_use_one_pipeline_each(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_s=100, timeout_s=0.5)
    raw = _raw(redis_url)
    raw.config_resetstat()
    keys = [_key(i) for i in range(200)]
    cache.set_many({k: {"i": i} for i, k in enumerate(keys)})
    assert cache.get_many(keys) == [{"i": i} for i in range(200)]
    stats = raw.info("commandstats")
    # reads are bounded GETRANGEs (max_entry_bytes), pipelined like the writes
    assert stats["cmdstat_getrange"]["calls"] == 200
    assert "cmdstat_get" not in stats and "cmdstat_mget" not in stats
    assert stats["cmdstat_set"]["calls"] == 200
    raw.close()
    cache.close()


def test_redis_wrong_type_key_is_a_miss_not_an_outage(redis_url: str) -> None:
    cache = RedisCache(redis_url, ttl_s=100, timeout_s=0.5, fail_mode="closed", allow_unsigned=True)
    raw = _raw(redis_url)
    k = _key("list")
    raw.rpush(k, "x")
    with capture_logs() as logs:
        assert cache.get(k) is None
    assert cache.healthy
    assert [e["event"] for e in logs] == ["cache.value.invalid"]
    raw.close()
    cache.close()


def _events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_redis_killed_and_restarted_fail_open(redis_factory: Callable[..., Any]) -> None:
    server = redis_factory()
    cache = RedisCache(server.url, ttl_s=100, timeout_s=0.2, retries=2, cooldown_s=0.3)
    with capture_logs() as logs:
        cache.set(_key(1), {"v": 1})
        assert cache.get(_key(1)) == {"v": 1}
        server.kill()
        results = []
        deadline = time.monotonic() + 0.8  # spans two cool-downs -> probes fail again
        while time.monotonic() < deadline:
            results.append(cache.get(_key(1)))
            cache.set(_key(2), {"v": 2})
            results.extend(cache.get_many([_key(1), _key(2)]))
            time.sleep(0.01)
        assert results and all(r is None for r in results)
        assert not cache.healthy
        server.restart()  # same port, empty (no persistence)
        time.sleep(0.45)  # let the cool-down pass so the next call probes
        assert cache.get(_key(1)) is None  # a real miss now
        assert cache.healthy
        cache.set(_key(1), {"v": 3})
        assert cache.get(_key(1)) == {"v": 3}
    down = _events(logs, "cache.redis.unavailable")
    up = _events(logs, "cache.redis.recovered")
    assert len(down) == 1 and len(up) == 1
    assert down[0]["log_level"] == "warning" and down[0]["fail_mode"] == "open"
    assert up[0]["downtime_s"] > 0
    names = [e["event"] for e in logs]
    assert names.index("cache.redis.unavailable") < names.index("cache.redis.recovered")
    cache.close()


async def test_redis_killed_and_restarted_fail_open_async(
    redis_factory: Callable[..., Any],
) -> None:
    server = redis_factory()
    cache = RedisCache(server.url, ttl_s=100, timeout_s=0.2, cooldown_s=0.2)
    with capture_logs() as logs:
        await cache.aset(_key(1), {"v": 1})
        assert await cache.aget(_key(1)) == {"v": 1}
        server.kill()
        got = await asyncio.gather(*(cache.aget(_key(i)) for i in range(20)))
        assert got == [None] * 20
        await cache.aset_many({_key(5): {"v": 5}})
        assert await cache.aget_many([_key(5)]) == [None]
        server.restart()
        await asyncio.sleep(0.3)
        assert await cache.aget(_key(1)) is None
        await cache.aset(_key(1), {"v": 2})
        assert await cache.aget(_key(1)) == {"v": 2}
    assert len(_events(logs, "cache.redis.unavailable")) == 1
    assert len(_events(logs, "cache.redis.recovered")) == 1
    await cache.aclose()
    cache.close()


async def test_redis_fail_closed_raises_while_down(redis_factory: Callable[..., Any]) -> None:
    server = redis_factory()
    cache = RedisCache(
        server.url,
        ttl_s=100,
        fail_mode="closed",
        timeout_s=0.2,
        cooldown_s=0.2,
        allow_unsigned=True,
    )
    cache.set(_key(1), {"v": 1})
    server.kill()
    with capture_logs() as logs:
        with pytest.raises(CacheUnavailableError, match="unavailable during get"):
            cache.get(_key(1))
        for call in (  # inside the cool-down: raised at once, no network
            lambda: cache.get(_key(1)),
            lambda: cache.set(_key(1), {"v": 2}),
            lambda: cache.get_many([_key(1)]),
            lambda: cache.set_many({_key(1): {"v": 2}}),
        ):
            with pytest.raises(CacheUnavailableError):
                call()
        with pytest.raises(CacheUnavailableError):
            await cache.aget(_key(1))
        with pytest.raises(SSDGuardError):  # CacheUnavailableError is an SSDGuardError
            await cache.aset(_key(1), {"v": 2})
        server.restart()
        await asyncio.sleep(0.3)
        assert cache.get(_key(1)) is None
        cache.set(_key(1), {"v": 4})
        assert await cache.aget(_key(1)) == {"v": 4}
    assert len(_events(logs, "cache.redis.unavailable")) == 1
    assert len(_events(logs, "cache.redis.recovered")) == 1
    await cache.aclose()
    cache.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_never_up_costs_little_thanks_to_circuit_breaker() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{_dead_port()}/0", ttl_s=10, cooldown_s=5)
    with capture_logs() as logs:
        start = time.perf_counter()
        for i in range(500):
            assert cache.get(_key(i)) is None
            cache.set(_key(i), {"i": i})
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert len(_events(logs, "cache.redis.unavailable")) == 1
    assert cache.ping() is False and not cache.healthy
    cache.close()


def test_redis_slow_server_times_out_into_a_miss(redis_factory: Callable[..., Any]) -> None:
    server = redis_factory()
    cache = RedisCache(server.url, ttl_s=100, timeout_s=0.05, retries=1, cooldown_s=0.1)
    cache.set(_key(1), {"v": 1})
    blocker = _raw(server.url)
    with capture_logs() as logs:
        # CLIENT PAUSE stalls every other client's commands (no DEBUG needed, Redis >= 3)
        paused_at = time.monotonic()
        blocker.execute_command("CLIENT", "PAUSE", "600")
        start = time.perf_counter()
        assert cache.get(_key(1)) is None  # too slow -> a miss, not a hang
        assert time.perf_counter() - start < 0.5
        time.sleep(max(0.0, paused_at + 0.75 - time.monotonic()))
        assert cache.get(_key(1)) == {"v": 1}
    assert len(_events(logs, "cache.redis.unavailable")) == 1
    assert "Timeout" in _events(logs, "cache.redis.unavailable")[0]["error"]
    assert len(_events(logs, "cache.redis.recovered")) == 1
    blocker.close()
    cache.close()


def test_redis_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fail_mode"):
        RedisCache("redis://localhost", fail_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl_s"):
        RedisCache("redis://localhost", ttl_s=0)
    with pytest.raises(ValueError, match="retries"):
        RedisCache("redis://localhost", retries=-1)


def test_redis_url_password_is_redacted() -> None:
    cache = RedisCache("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(cache)
    cache.close()
