"""Score cache: one protocol, an in-process LRU and a Redis implementation.

Keys come from :func:`make_key` (``namespace:sha256`` of the *exact* text the scorer sees);
values are small mappings of names to finite numbers (e.g. ``{"entropy": 2.31}``) stored
in an envelope ``{"v": 1, "value": {...}}``. Every value read back is validated: another
schema version, undecodable JSON, a non-number (``true``, a string) or a non-finite number
(``NaN``, ``Infinity``) is a miss, logged as ``cache.value.invalid``.

Signed values: with an HMAC key (``hmac_key=``, or for :class:`RedisCache` the
``SSD_GUARD_CACHE_HMAC_KEY`` environment variable) every stored value carries
``"sig": HMAC-SHA256(key, cache key + value)``; a value read back with a missing or wrong
signature is a miss, logged as ``cache.value.bad_signature``. Use it whenever the cache is
shared: keys derive from public parts, so without a signature anyone who can write to the
cache can forge a score.

Redis failures never crash the guard and never produce a wrong score: with
``fail_mode="open"`` a down / slow Redis is a miss and writes are skipped; with
``fail_mode="closed"`` :class:`~ssd_guard.errors.CacheUnavailableError` is raised. A state
change is logged once (``cache.redis.unavailable`` / ``cache.redis.recovered``), and a
circuit breaker skips Redis for ``cooldown_s`` after a failure, then lets one probe through.
A failure absorbed in open mode is reported to :func:`collect_errors` (the guard puts its
kind on the decision event as ``cache_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import math
import os
import sys
import threading
import time
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import redis
import redis.asyncio as aredis
import structlog
from redis.backoff import NoBackoff
from tenacity import (
    DoAttempt,
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from ssd_guard._flow import Call, Flow, adrive, drive
from ssd_guard.errors import CacheUnavailableError

if TYPE_CHECKING:
    from ssd_guard.policy import CacheConfig

__all__ = [
    "HMAC_KEY_ENV",
    "SCHEMA_VERSION",
    "MemoryCache",
    "RedisCache",
    "ScoreCache",
    "cache_from_config",
    "collect_errors",
    "make_key",
    "normalise_text",
    "report_error",
]

#: Version of the stored value envelope; entries with another version are misses.
SCHEMA_VERSION = 1
#: v2: keys are computed on the exact text (v1 collapsed whitespace, unlike the scorer).
_KEY_FORMAT = "ssd-guard/score-key/v2"
#: Environment variable holding the HMAC key :class:`RedisCache` signs values with.
HMAC_KEY_ENV = "SSD_GUARD_CACHE_HMAC_KEY"

_log = structlog.get_logger("ssd_guard.cache")

Items = Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]]


# --------------------------------------------------------------------------------------
# Keys and values
# --------------------------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Unicode NFC, strip, collapse runs of whitespace to one space; case is kept.

    Not used for cache keys: the scorer sees the exact text, so :func:`make_key` does too
    (two texts that differ only in whitespace can score differently)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def make_key(
    namespace: str,
    *,
    student_fingerprint: str,
    model_id: str,
    layer: int,
    prompt: str,
    answer: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """``f"{namespace}:" + sha256`` of a canonical JSON encoding of everything a score
    depends on. The prompt (and answer) are keyed on their exact text -- the text the
    scorer sees -- so prompts that differ in whitespace or Unicode normalisation never
    share an entry; ``answer=None`` (a prompt-level entry) and ``answer=""`` give different
    keys. *extra* (JSON-able) separates entries that differ in anything else (e.g. a
    scorer option)."""
    payload = [
        _KEY_FORMAT,
        str(student_fingerprint),
        str(model_id),
        int(layer),
        str(prompt),
        None if answer is None else str(answer),
        None if extra is None else dict(extra),
    ]
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return f"{namespace}:{hashlib.sha256(encoded.encode('utf-8')).hexdigest()}"


def _clean_value(value: Any) -> dict[str, float]:
    """*value* as ``{name: finite float}``; TypeError / ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise TypeError(f"cache values must be mappings, got {type(value).__name__}")
    out: dict[str, float] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise TypeError(f"cache value names must be str, got {type(name).__name__}")
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise TypeError(f"cache value {name!r} must be a number, got {type(item).__name__}")
        try:
            number = float(item)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"cache value {name!r} is not finite: {item!r}")
        out[name] = number
    return out


def _signature(secret: bytes, key: str, body: str) -> str:
    message = f"{key}\n{body}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _secret(hmac_key: str | bytes | None) -> bytes | None:
    if hmac_key is None or len(hmac_key) == 0:
        return None
    return hmac_key.encode("utf-8") if isinstance(hmac_key, str) else bytes(hmac_key)


def _env_secret() -> bytes | None:
    return _secret(os.environ.get(HMAC_KEY_ENV))


class _Codec:
    """Encodes / validates (and signs / verifies) the stored envelopes of one cache."""

    def __init__(self, backend: str, secret: bytes | None) -> None:
        self.backend = backend
        self.secret = secret

    def encode(self, key: str, value: Mapping[str, Any]) -> str:
        clean = _clean_value(value)
        envelope: dict[str, Any] = {"v": SCHEMA_VERSION, "value": clean}
        if self.secret is not None:
            envelope["sig"] = _signature(self.secret, key, _canonical(clean))
        return json.dumps(envelope, separators=(",", ":"), allow_nan=False)

    def items(self, items: Items) -> list[tuple[str, str]]:
        pairs = items.items() if isinstance(items, Mapping) else items
        return [(k, self.encode(k, v)) for k, v in pairs]

    def _invalid(self, key: str, reason: str) -> None:
        _log.warning("cache.value.invalid", backend=self.backend, key=key, reason=reason)

    def decode(self, raw: str | bytes | None, key: str) -> dict[str, float] | None:
        if raw is None:
            return None
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            envelope = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._invalid(key, f"undecodable: {exc}")
            return None
        if not isinstance(envelope, dict) or envelope.get("v") != SCHEMA_VERSION:
            version = envelope.get("v") if isinstance(envelope, dict) else None
            self._invalid(key, f"schema version {version!r}, expected {SCHEMA_VERSION}")
            return None
        value = envelope.get("value")
        if not isinstance(value, dict):
            self._invalid(key, "value not a mapping")
            return None
        try:
            clean = _clean_value(value)
        except (TypeError, ValueError) as exc:
            self._invalid(key, str(exc))
            return None
        if self.secret is not None:
            sig = envelope.get("sig")
            if not isinstance(sig, str):
                reason = "missing signature"
            elif not hmac.compare_digest(sig, _signature(self.secret, key, _canonical(clean))):
                reason = "signature mismatch"
            else:
                return clean
            _log.warning("cache.value.bad_signature", backend=self.backend, key=key, reason=reason)
            return None
        return clean


def _canonical(value: Mapping[str, float]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


# --------------------------------------------------------------------------------------
# Failures absorbed in fail-open mode
# --------------------------------------------------------------------------------------
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


def _check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")


# --------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------
@runtime_checkable
class ScoreCache(Protocol):
    """What the guard needs of a score cache; sync and async twins."""

    namespace: str

    @property
    def healthy(self) -> bool: ...

    def get(self, key: str) -> dict[str, Any] | None: ...

    def set(self, key: str, value: Mapping[str, Any], ttl_s: int | None = None) -> None: ...

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]: ...

    def set_many(self, items: Items, ttl_s: int | None = None) -> None: ...

    async def aget(self, key: str) -> dict[str, Any] | None: ...

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: int | None = None) -> None: ...

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]: ...

    async def aset_many(self, items: Items, ttl_s: int | None = None) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------
class MemoryCache:
    """Thread-safe in-process LRU with optional TTL (monotonic clock, injectable).

    Values are validated like :class:`RedisCache`'s; they are signed only when *hmac_key*
    is given (an in-process cache is not shared, so the environment key is not read)."""

    backend = "memory"

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float | None = None,
        *,
        namespace: str = "ssd-guard",
        clock: Callable[[], float] = time.monotonic,
        hmac_key: str | bytes | None = None,
    ) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        _check_ttl(ttl_s)
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.namespace = namespace
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[str, tuple[float | None, str]] = OrderedDict()
        self._codec = _Codec(self.backend, _secret(hmac_key))

    @property
    def healthy(self) -> bool:
        return True

    @property
    def signed(self) -> bool:
        """True when values are signed (and verified) with an HMAC key."""
        return self._codec.secret is not None

    def key(self, **parts: Any) -> str:
        """:func:`make_key` with this cache's namespace."""
        return make_key(self.namespace, **parts)

    def __len__(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for exp, _ in self._data.values() if exp is None or exp > now)

    def _get_raw(self, key: str, now: float) -> str | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, raw = entry
        if expires is not None and expires <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return raw

    def _set_raw(self, key: str, raw: str, ttl_s: float | None = None) -> None:
        ttl = self.ttl_s if ttl_s is None else ttl_s
        with self._lock:
            expires = None if ttl is None else self._clock() + ttl
            self._data[key] = (expires, raw)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            raw = self._get_raw(key, self._clock())
        return self._codec.decode(raw, key)

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        with self._lock:
            now = self._clock()
            raws = [self._get_raw(k, now) for k in keys]
        return [self._codec.decode(r, k) for k, r in zip(keys, raws, strict=True)]

    def set(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        _check_ttl(ttl_s)
        self._set_raw(key, self._codec.encode(key, value), ttl_s)

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        _check_ttl(ttl_s)
        for key, raw in self._codec.items(items):
            self._set_raw(key, raw, ttl_s)

    async def aget(self, key: str) -> dict[str, Any] | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return self.get_many(keys)

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        self.set(key, value, ttl_s)

    async def aset_many(self, items: Items, ttl_s: float | None = None) -> None:
        self.set_many(items, ttl_s)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def close(self) -> None:
        """Nothing to release; the entries stay usable."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"MemoryCache(max_entries={self.max_entries}, ttl_s={self.ttl_s})"


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------
#: Errors that mean "Redis is unreachable or too slow" and are worth a retry.
_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    asyncio.TimeoutError,
)
#: Every error that counts as "the cache is unavailable".
_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, *_TRANSIENT)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError | OSError):
        return "connection"
    return "error"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return url


class RedisCache:
    """Score cache in Redis (plain string commands: ``SET key json EX ttl``, ``MGET``,
    pipelined ``SET`` for batches), with sync (``redis.Redis``) and async
    (``redis.asyncio.Redis``, one client per event loop) connection pools.

    Each command gets *timeout_s* socket / connect timeouts and up to *retries* extra
    attempts (tenacity) on connection errors and timeouts. See the module docstring for
    what happens when Redis is down. Each operation is written once, as a flow of
    :class:`Call` effects (:meth:`_op`: circuit breaker, retries, fail mode), driven by the
    sync method with :func:`drive` and by the async one with :func:`adrive`.

    *hmac_key* signs every value (default: the ``SSD_GUARD_CACHE_HMAC_KEY`` environment
    variable, when set and not empty); with a key, unsigned or wrongly signed values are
    misses. Every instance sharing the Redis must use the same key.
    """

    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 86_400,
        fail_mode: Literal["open", "closed"] = "open",
        namespace: str = "ssd-guard",
        timeout_s: float = 0.05,
        retries: int = 2,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        hmac_key: str | bytes | None = None,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', got {fail_mode!r}")
        _check_ttl(ttl_s)
        if ttl_s is None:
            raise ValueError("RedisCache needs a ttl_s")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url
        self.ttl_s = ttl_s
        self.fail_mode = fail_mode
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.retries = retries
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._codec = _Codec(self.backend, _secret(hmac_key) or _env_secret())
        self._client_kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": 0,
            "decode_responses": False,
        }
        self._client = redis.Redis.from_url(
            url, retry=redis.retry.Retry(NoBackoff(), 0), **self._client_kwargs
        )
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._state_lock = threading.Lock()
        self._down = False
        self._down_since = 0.0
        self._probe_at = 0.0
        self._closed = False

    # -- state ---------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False from a failed command until a later one succeeds."""
        return not self._down

    @property
    def signed(self) -> bool:
        """True when values are signed (and verified) with an HMAC key."""
        return self._codec.secret is not None

    def key(self, **parts: Any) -> str:
        """:func:`make_key` with this cache's namespace."""
        return make_key(self.namespace, **parts)

    def _admit(self) -> Literal["go", "probe", "skip"]:
        if not self._down:
            return "go"
        with self._state_lock:
            if not self._down:
                return "go"
            now = self._clock()
            if now >= self._probe_at:
                self._probe_at = now + self.cooldown_s
                return "probe"
            return "skip"

    def _unavailable(self, op: str, cause: BaseException | None) -> CacheUnavailableError:
        since = self._clock() - self._down_since if self._down else 0.0
        why = f": {cause}" if cause is not None else f" (down for {since:.1f} s)"
        return CacheUnavailableError(
            f"redis cache at {_redact(self.url)} is unavailable during {op}{why}"
        )

    def _on_failure(self, op: str, exc: BaseException) -> None:
        with self._state_lock:
            now = self._clock()
            self._probe_at = now + self.cooldown_s
            if self._down:
                return
            self._down = True
            self._down_since = now
        _log.warning(
            "cache.redis.unavailable",
            url=_redact(self.url),
            op=op,
            error=f"{type(exc).__name__}: {exc}",
            fail_mode=self.fail_mode,
            cooldown_s=self.cooldown_s,
        )

    def _on_success(self) -> None:
        if not self._down:
            return
        with self._state_lock:
            if not self._down:
                return
            self._down = False
            downtime = self._clock() - self._down_since
        _log.warning("cache.redis.recovered", url=_redact(self.url), downtime_s=round(downtime, 3))

    def _retrying(self, attempts: int) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(attempts),
            "wait": wait_exponential(multiplier=0.005, max=0.05),
            "retry": retry_if_exception_type(_TRANSIENT),
            "reraise": True,
        }

    def _op(self, op: str, fn: Callable[[Any], Any], fallback: Any) -> Flow[Any]:
        """One Redis command, written once for both drivers: ``fn(client)`` on the sync
        client (its result) or the async one (an awaitable, bounded by a deadline), through
        the circuit breaker, with up to ``retries`` retries on transient errors
        (tenacity; exponential wait: 5 ms, 10 ms... at most 50 ms; a probe gets one
        attempt)."""
        admit = self._admit()
        if admit == "skip":
            if self.fail_mode == "closed":
                raise self._unavailable(op, None)
            report_error("circuit-open")
            return fallback
        attempts = 1 if admit == "probe" else self.retries + 1
        command = Call(lambda: fn(self._client), lambda: self._acommand(fn))
        # tenacity's retry loop (Retrying.__call__), with the attempt and the sleep yielded
        retrying = Retrying(**self._retrying(attempts))
        retrying.begin()
        state = RetryCallState(retrying, fn=None, args=(), kwargs={})
        try:
            while True:
                do = retrying.iter(state)
                if isinstance(do, DoAttempt):
                    try:
                        state.set_result((yield command))
                    except Exception:
                        state.set_exception(sys.exc_info())  # type: ignore[arg-type]
                elif isinstance(do, DoSleep):
                    state.prepare_for_next_attempt()
                    yield Call(
                        functools.partial(time.sleep, do), functools.partial(asyncio.sleep, do)
                    )
                else:
                    result = do
                    break
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                _log.warning("cache.value.invalid", backend=self.backend, reason=str(exc))
                self._on_success()
                return fallback
            return self._fail(op, exc, fallback)
        except _ERRORS as exc:
            return self._fail(op, exc, fallback)
        self._on_success()
        return result

    async def _acommand(self, fn: Callable[[Any], Any]) -> Any:
        # connect + write + read, each bounded by the socket timeout; a hard upper bound so
        # a wedged connection can never stall the event loop's caller for long.
        return await asyncio.wait_for(fn(self._aclient()), 3 * self.timeout_s + 0.05)

    def _fail(self, op: str, exc: BaseException, fallback: Any) -> Any:
        self._on_failure(op, exc)
        if self.fail_mode == "closed":
            raise self._unavailable(op, exc) from exc
        report_error(_error_kind(exc))
        return fallback

    def _aclient(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = aredis.Redis.from_url(
                self.url, retry=aredis.retry.Retry(NoBackoff(), 0), **self._client_kwargs
            )
            self._aclients[loop] = client
        return client

    def _ttl_args(self, ttl_s: float | None) -> tuple[int | None, int | None]:
        """``(ex, px)`` for SET: whole seconds as EX, fractional ones as PX milliseconds."""
        _check_ttl(ttl_s)
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if float(ttl).is_integer():
            return int(ttl), None
        return None, max(1, round(ttl * 1000))

    # -- flows (one per operation; the sync / async methods below drive them) -------------
    def _get_flow(self, key: str) -> Flow[dict[str, Any] | None]:
        raw = yield from self._op("get", lambda c: c.get(key), None)
        return self._codec.decode(raw, key)

    def _get_many_flow(self, keys: Sequence[str]) -> Flow[list[dict[str, Any] | None]]:
        keys = list(keys)
        if not keys:
            return []
        raws = yield from self._op("get_many", lambda c: c.mget(keys), [None] * len(keys))
        return [self._codec.decode(r, k) for k, r in zip(keys, raws, strict=True)]

    def _set_flow(self, key: str, raw: str | bytes, ttl_s: float | None) -> Flow[None]:
        ttl = self._ttl_args(ttl_s)
        yield from self._op("set", lambda c: c.set(key, raw, ex=ttl[0], px=ttl[1]), None)

    def _set_many_flow(self, items: Items, ttl_s: float | None) -> Flow[None]:
        pairs, ttl = self._codec.items(items), self._ttl_args(ttl_s)
        if not pairs:
            return

        def write(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for key, raw in pairs:
                pipe.set(key, raw, ex=ttl[0], px=ttl[1])
            return pipe.execute()  # the async client's is awaited by the driver

        yield from self._op("set_many", write, None)

    # -- sync ----------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        return drive(self._get_flow(key))

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return drive(self._get_many_flow(keys))

    def set(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        drive(self._set_flow(key, self._codec.encode(key, value), ttl_s))

    def _set_raw(self, key: str, raw: str | bytes, ttl_s: float | None = None) -> None:
        drive(self._set_flow(key, raw, ttl_s))

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        drive(self._set_many_flow(items, ttl_s))

    def delete(self, key: str) -> None:
        drive(self._op("delete", lambda c: c.delete(key), None))

    def clear(self) -> None:
        """Delete every key of this cache's namespace (SCAN + DEL)."""

        def wipe(client: redis.Redis) -> None:
            batch: list[bytes] = []
            for k in client.scan_iter(match=f"{self.namespace}:*", count=500):
                batch.append(k)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch = []
            if batch:
                client.delete(*batch)

        drive(self._op("clear", wipe, None))

    def ping(self) -> bool:
        """Probe Redis now (bypassing the circuit breaker); updates :attr:`healthy`."""
        try:
            self._client.ping()
        except _ERRORS as exc:
            self._on_failure("ping", exc)
            return False
        self._on_success()
        return True

    # -- async ---------------------------------------------------------------------------
    async def aget(self, key: str) -> dict[str, Any] | None:
        return await adrive(self._get_flow(key))

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return await adrive(self._get_many_flow(keys))

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        await adrive(self._set_flow(key, self._codec.encode(key, value), ttl_s))

    async def aset_many(self, items: Items, ttl_s: float | None = None) -> None:
        await adrive(self._set_many_flow(items, ttl_s))

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the sync connection pool (async clients: :meth:`aclose`)."""
        self._client.close()

    async def aclose(self) -> None:
        """Release the async client of the running loop (and forget the others)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - called outside a loop
            loop = None
        client = self._aclients.pop(loop, None) if loop is not None else None
        self._aclients.clear()
        if client is not None:
            await client.aclose()

    def __repr__(self) -> str:
        return (
            f"RedisCache({_redact(self.url)!r}, ttl_s={self.ttl_s}, fail_mode={self.fail_mode!r}, "
            f"timeout_s={self.timeout_s}, retries={self.retries}, signed={self.signed})"
        )


def cache_from_config(cfg: CacheConfig) -> MemoryCache | RedisCache:
    """The cache a policy's ``cache:`` section describes."""
    if cfg.url == "memory":
        return MemoryCache(cfg.max_entries, cfg.ttl_s, namespace=cfg.namespace)
    return RedisCache(
        cfg.url,
        ttl_s=cfg.ttl_s,
        fail_mode=cfg.fail_mode,
        namespace=cfg.namespace,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        cooldown_s=cfg.cooldown_s,
    )
