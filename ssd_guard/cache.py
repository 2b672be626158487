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
cache can forge a score. A :class:`RedisCache` without a key logs ``cache.redis.unsigned``
and warns (:class:`UnsignedCacheWarning`); with ``fail_mode="closed"`` it refuses to be
built (:class:`~ssd_guard.errors.ConfigError`) unless ``allow_unsigned=True``. A cache
without a key rejects *signed* values too (``cache.value.bad_signature``): a process that
lost its key must not take the others' entries for unsigned ones.

Bounded reads: a Redis value longer than ``max_entry_bytes`` is never read whole (at most
that many bytes plus one come back); it is a miss, logged as ``cache.value.invalid``
(reason ``oversized``) in both fail modes -- bad data, not an outage.

Redis failures never crash the guard and never produce a wrong score: with
``fail_mode="open"`` a down / slow Redis is a miss and writes are skipped; with
``fail_mode="closed"`` :class:`~ssd_guard.errors.CacheUnavailableError` is raised. A state
change is logged once (``cache.redis.unavailable`` / ``cache.redis.recovered``), and a
circuit breaker skips Redis for ``cooldown_s`` after a failure, then lets one probe through.
Every command has an overall deadline (``command_deadline_s``, retries included), so a
server that trickles its reply -- each byte resetting the socket timeout -- is a timeout
too, sync and async alike.
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
import warnings
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
import redis.connection
import structlog
from redis.backoff import NoBackoff
from tenacity import (
    DoAttempt,
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from ssd_guard._flow import Call, Flow, adrive, drive
from ssd_guard.errors import CacheUnavailableError, ConfigError

if TYPE_CHECKING:
    from ssd_guard.policy import CacheConfig

__all__ = [
    "DEFAULT_MAX_ENTRY_BYTES",
    "HMAC_KEY_ENV",
    "SCHEMA_VERSION",
    "MemoryCache",
    "RedisCache",
    "ScoreCache",
    "UnsignedCacheWarning",
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
#: Default :class:`RedisCache` ``max_entry_bytes``: a stored score entry is ~100 bytes, so
#: 256 KiB is generous, yet a batch of N keys can never pull more than N x 256 KiB.
DEFAULT_MAX_ENTRY_BYTES = 256 * 1024

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
        if "sig" in envelope:
            # signed by a process that has the key this one lacks (a misconfiguration, or a
            # lost key): never taken for an unsigned value
            _log.warning(
                "cache.value.bad_signature",
                backend=self.backend,
                key=key,
                reason="signed value, but no hmac key is configured to verify it",
            )
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


class UnsignedCacheWarning(UserWarning):
    """A :class:`RedisCache` runs without an HMAC key: anyone who can write to that Redis
    can forge scores (set ``SSD_GUARD_CACHE_HMAC_KEY``)."""


class _DeadlineExceeded(redis.TimeoutError):
    """A command ran past its overall deadline (``command_deadline_s``); never retried."""


#: When the sync socket I/O of the current command attempt must end (None: unbounded).
_IO_DEADLINE: ContextVar[float | None] = ContextVar("ssd_guard_cache_io_deadline", default=None)


class _DeadlineSocket:
    """The socket of a sync Redis connection, each read / write of which ends by
    :data:`_IO_DEADLINE`: the socket timeout bounds the wait for *each* chunk, so a server
    sending one byte every 30 ms would otherwise hold a reply for as long as it likes.
    Before a ``recv`` / ``recv_into`` / ``sendall`` the timeout is lowered to the time left
    (and restored after); past the deadline the call raises :class:`TimeoutError`
    (``socket.timeout``), which redis-py turns into a :class:`redis.TimeoutError`, dropping
    the connection (its reply half read). Everything else is the wrapped socket's."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _bounded(self, call: Callable[..., Any], *args: Any) -> Any:
        deadline = _IO_DEADLINE.get()
        if deadline is None:
            return call(*args)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("cache command deadline exceeded")  # socket.timeout
        timeout = self._sock.gettimeout()
        if timeout is not None and timeout <= left:  # includes 0.0: a non-blocking poll
            return call(*args)
        self._sock.settimeout(left)
        try:
            return call(*args)
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(timeout)

    def recv(self, *args: Any) -> Any:
        return self._bounded(self._sock.recv, *args)

    def recv_into(self, *args: Any) -> Any:
        return self._bounded(self._sock.recv_into, *args)

    def sendall(self, *args: Any) -> Any:
        return self._bounded(self._sock.sendall, *args)


@functools.cache
def _deadline_connection(base: type[Any]) -> type[Any]:
    """redis-py's connection class *base* (TCP, TLS or unix socket), its socket wrapped in a
    :class:`_DeadlineSocket` (TLS: the wrapped TLS socket, so the handshake is unchanged)."""

    def _connect(self: Any) -> Any:
        return _DeadlineSocket(base._connect(self))

    return type(f"Deadline{base.__name__}", (base,), {"_connect": _connect, "__module__": __name__})


def _connection_class(url: str) -> type[Any]:
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        return _deadline_connection(redis.connection.SSLConnection)
    if scheme == "unix":
        return _deadline_connection(redis.connection.UnixDomainSocketConnection)
    return _deadline_connection(redis.connection.Connection)


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

    *command_deadline_s* bounds each operation as a whole, retries and back-off included
    (default: ``4 * timeout_s + 0.05``, i.e. 0.25 s at the default 0.05 s): past it the
    command is a ``"timeout"`` failure handled by *fail_mode*. The socket timeouts alone
    cannot bound a reply that trickles in (each byte restarts them). One attempt is also
    cut at ``3 * timeout_s + 0.05`` (connect + write + read), leaving time for a retry.

    *max_entry_bytes* (default :data:`DEFAULT_MAX_ENTRY_BYTES`, 256 KiB) caps what one entry
    read may transfer: reads are ``GETRANGE key 0 max_entry_bytes`` (one pipeline for a
    batch), so a huge value planted under a score key costs at most that many bytes plus
    one, never the whole value; it is a miss logged as ``cache.value.invalid`` (reason
    ``oversized``) -- the guard computes the real score and overwrites it. Writing a value
    that would encode to more raises :class:`ValueError`.

    *hmac_key* signs every value (default: the ``SSD_GUARD_CACHE_HMAC_KEY`` environment
    variable, when set and not empty); with a key, unsigned or wrongly signed values are
    misses, and without one signed values are. Every instance sharing the Redis must use
    the same key. Without a key the cache logs ``cache.redis.unsigned`` and warns
    (:class:`UnsignedCacheWarning`); with ``fail_mode="closed"`` it raises
    :class:`~ssd_guard.errors.ConfigError` instead, unless *allow_unsigned* is true
    (which also turns the warning into an ``info`` event).
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
        command_deadline_s: float | None = None,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        allow_unsigned: bool = False,
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', got {fail_mode!r}")
        _check_ttl(ttl_s)
        if ttl_s is None:
            raise ValueError("RedisCache needs a ttl_s")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if command_deadline_s is None:
            command_deadline_s = 4 * timeout_s + 0.05
        elif not command_deadline_s > 0:
            raise ValueError(f"command_deadline_s must be > 0, got {command_deadline_s}")
        if isinstance(max_entry_bytes, bool) or not isinstance(max_entry_bytes, int):
            raise ValueError(f"max_entry_bytes must be an int, got {max_entry_bytes!r}")
        if max_entry_bytes < 1:
            raise ValueError(f"max_entry_bytes must be >= 1, got {max_entry_bytes}")
        secret = _secret(hmac_key) or _env_secret()
        if secret is None:
            self._unsigned(url, fail_mode, allow_unsigned)
        self.url = url
        self.ttl_s = ttl_s
        self.fail_mode = fail_mode
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.retries = retries
        self.cooldown_s = cooldown_s
        self.command_deadline_s = float(command_deadline_s)
        self.max_entry_bytes = max_entry_bytes
        self.allow_unsigned = allow_unsigned
        self._clock = clock
        self._codec = _Codec(self.backend, secret)
        self._client_kwargs: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": 0,
            "decode_responses": False,
        }
        self._client = redis.Redis.from_url(
            url,
            retry=redis.retry.Retry(NoBackoff(), 0),
            connection_class=_connection_class(url),
            **self._client_kwargs,
        )
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aredis.Redis] = (
            weakref.WeakKeyDictionary()
        )
        self._state_lock = threading.Lock()
        self._down = False
        self._down_since = 0.0
        self._probe_at = 0.0
        self._closed = False

    @staticmethod
    def _unsigned(url: str, fail_mode: str, allow_unsigned: bool) -> None:
        """No HMAC key: refuse (fail closed, not explicitly allowed), or log and warn."""
        how = (
            f"set the {HMAC_KEY_ENV} environment variable (the same secret in every process "
            "sharing this Redis) or pass hmac_key=<secret>"
        )
        if fail_mode == "closed" and not allow_unsigned:
            raise ConfigError(
                f"redis cache at {_redact(url)} has fail_mode='closed' but no HMAC key: "
                f"without one anyone who can write to this Redis can forge scores; {how}; "
                "to run it unsigned anyway pass allow_unsigned=True"
            )
        fields: dict[str, Any] = {
            "url": _redact(url),
            "fail_mode": fail_mode,
            "allow_unsigned": allow_unsigned,
        }
        if allow_unsigned:
            _log.info("cache.redis.unsigned", **fields)
            return
        _log.warning("cache.redis.unsigned", hint=how, **fields)
        warnings.warn(
            f"redis cache at {_redact(url)} is not signed: anyone who can write to this Redis "
            f"can forge scores; {how} (or pass allow_unsigned=True to accept this)",
            UnsignedCacheWarning,
            stacklevel=3,
        )

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
            "retry": retry_if_exception_type(_TRANSIENT)
            & retry_if_not_exception_type(_DeadlineExceeded),
            "reraise": True,
        }

    def _op(
        self, op: str, fn: Callable[[Any], Any], fallback: Any, *, bounded: bool = True
    ) -> Flow[Any]:
        """One Redis command, written once for both drivers: ``fn(client)`` on the sync
        client (its result) or the async one (an awaitable), through the circuit breaker,
        with up to ``retries`` retries on transient errors (tenacity; exponential wait:
        5 ms, 10 ms... at most 50 ms; a probe gets one attempt), all of it within
        ``command_deadline_s`` unless *bounded* is false."""
        admit = self._admit()
        if admit == "skip":
            if self.fail_mode == "closed":
                raise self._unavailable(op, None)
            report_error("circuit-open")
            return fallback
        attempts = 1 if admit == "probe" else self.retries + 1
        deadline = time.monotonic() + self.command_deadline_s if bounded else None
        command = Call(
            functools.partial(self._scommand, fn, deadline),
            functools.partial(self._acommand, fn, deadline),
        )
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
                    pause = float(do)
                    if deadline is not None:  # the next attempt fails at once if none is left
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    yield Call(
                        functools.partial(time.sleep, pause),
                        functools.partial(asyncio.sleep, pause),
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

    def _attempt_deadline(self, deadline: float) -> float:
        """When an attempt started now must end: connect + write + read, each bounded by
        the socket timeout, so ``3 * timeout_s + 0.05``, and never past *deadline*."""
        now = time.monotonic()
        if now >= deadline:
            raise _DeadlineExceeded(self._deadline_message("no time left for another attempt"))
        return min(deadline, now + 3 * self.timeout_s + 0.05)

    def _deadline_message(self, detail: str) -> str:
        return f"command deadline of {self.command_deadline_s:g} s exceeded ({detail})"

    def _check_deadline(self, deadline: float, exc: BaseException) -> None:
        """*exc* ended an attempt: past *deadline*, it ends the whole command."""
        if time.monotonic() >= deadline - 0.001:
            detail = f"{exc}" or type(exc).__name__
            raise _DeadlineExceeded(self._deadline_message(detail)) from exc

    def _scommand(self, fn: Callable[[Any], Any], deadline: float | None) -> Any:
        # the sync client's sockets read the attempt's deadline (_DeadlineSocket)
        if deadline is None:
            return fn(self._client)
        token = _IO_DEADLINE.set(self._attempt_deadline(deadline))
        try:
            return fn(self._client)
        except _TRANSIENT as exc:
            self._check_deadline(deadline, exc)
            raise
        finally:
            _IO_DEADLINE.reset(token)

    async def _acommand(self, fn: Callable[[Any], Any], deadline: float | None) -> Any:
        # a hard upper bound, so a wedged or trickling connection can never stall the event
        # loop's caller for long
        if deadline is None:
            return await asyncio.wait_for(fn(self._aclient()), 3 * self.timeout_s + 0.05)
        left = self._attempt_deadline(deadline) - time.monotonic()
        try:
            return await asyncio.wait_for(fn(self._aclient()), left)
        except _TRANSIENT as exc:
            self._check_deadline(deadline, exc)
            raise

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

    # -- values --------------------------------------------------------------------------
    # Reads are GETRANGE key 0 max_entry_bytes, not GET / MGET: Redis then sends at most
    # max_entry_bytes + 1 bytes of any value, so a huge value planted under a score key is
    # never transferred (nor buffered) whole, and one more byte than the cap tells "too
    # long" from "exactly the cap". No STRLEN round trip and no Lua (scripting may be
    # disabled); a batch is one pipeline of GETRANGEs (one round trip, like MGET). GETRANGE
    # answers "" for a missing key: a miss (an empty value is no valid entry anyway).
    def _decode(self, raw: bytes | str | None, key: str) -> dict[str, Any] | None:
        if not raw:
            return None
        if len(raw) > self.max_entry_bytes:
            _log.warning(
                "cache.value.invalid",
                backend=self.backend,
                key=key,
                reason=f"oversized: more than {self.max_entry_bytes} bytes (max_entry_bytes)",
                max_entry_bytes=self.max_entry_bytes,
            )
            return None
        return self._codec.decode(raw, key)

    def _encode(self, key: str, value: Mapping[str, Any]) -> str:
        raw = self._codec.encode(key, value)  # ASCII JSON: characters are bytes
        if len(raw) > self.max_entry_bytes:
            raise ValueError(
                f"cache value for {key!r} encodes to {len(raw)} bytes, more than "
                f"max_entry_bytes={self.max_entry_bytes} (it could never be read back)"
            )
        return raw

    def _encode_items(self, items: Items) -> list[tuple[str, str]]:
        pairs = items.items() if isinstance(items, Mapping) else items
        return [(k, self._encode(k, v)) for k, v in pairs]

    # -- flows (one per operation; the sync / async methods below drive them) -------------
    def _get_flow(self, key: str) -> Flow[dict[str, Any] | None]:
        end = self.max_entry_bytes
        raw = yield from self._op("get", lambda c: c.getrange(key, 0, end), None)
        return self._decode(raw, key)

    def _get_many_flow(self, keys: Sequence[str]) -> Flow[list[dict[str, Any] | None]]:
        keys = list(keys)
        if not keys:
            return []
        end, fallback = self.max_entry_bytes, [None] * len(keys)

        def read(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 0, end)
            # per-command errors come back in place: a wrong-type key spoils only itself
            return pipe.execute(raise_on_error=False)  # the async client's is awaited

        raws = yield from self._op("get_many", read, fallback)
        out: list[dict[str, Any] | None] = []
        for key, raw in zip(keys, raws, strict=True):
            if isinstance(raw, redis.ResponseError):
                if not str(raw).startswith("WRONGTYPE"):
                    return self._fail("get_many", raw, fallback)  # type: ignore[no-any-return]
                _log.warning("cache.value.invalid", backend=self.backend, key=key, reason=str(raw))
                out.append(None)
                continue
            out.append(self._decode(raw, key))
        return out

    def _set_flow(self, key: str, raw: str | bytes, ttl_s: float | None) -> Flow[None]:
        ttl = self._ttl_args(ttl_s)
        yield from self._op("set", lambda c: c.set(key, raw, ex=ttl[0], px=ttl[1]), None)

    def _set_many_flow(self, items: Items, ttl_s: float | None) -> Flow[None]:
        pairs, ttl = self._encode_items(items), self._ttl_args(ttl_s)
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
        drive(self._set_flow(key, self._encode(key, value), ttl_s))

    def _set_raw(self, key: str, raw: str | bytes, ttl_s: float | None = None) -> None:
        drive(self._set_flow(key, raw, ttl_s))

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        drive(self._set_many_flow(items, ttl_s))

    def delete(self, key: str) -> None:
        drive(self._op("delete", lambda c: c.delete(key), None))

    def clear(self) -> None:
        """Delete every key of this cache's namespace (SCAN + DEL; an admin operation: not
        bounded by ``command_deadline_s``, only by the socket timeouts)."""

        def wipe(client: redis.Redis) -> None:
            batch: list[bytes] = []
            for k in client.scan_iter(match=f"{self.namespace}:*", count=500):
                batch.append(k)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch = []
            if batch:
                client.delete(*batch)

        drive(self._op("clear", wipe, None, bounded=False))

    def ping(self) -> bool:
        """Probe Redis now (bypassing the circuit breaker, within ``command_deadline_s``);
        updates :attr:`healthy`."""
        token = _IO_DEADLINE.set(time.monotonic() + self.command_deadline_s)
        try:
            self._client.ping()
        except _ERRORS as exc:
            self._on_failure("ping", exc)
            return False
        finally:
            _IO_DEADLINE.reset(token)
        self._on_success()
        return True

    # -- async ---------------------------------------------------------------------------
    async def aget(self, key: str) -> dict[str, Any] | None:
        return await adrive(self._get_flow(key))

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return await adrive(self._get_many_flow(keys))

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        await adrive(self._set_flow(key, self._encode(key, value), ttl_s))

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
    # command_deadline_s / max_entry_bytes / allow_unsigned: read when the policy schema
    # has them, the RedisCache defaults otherwise
    return RedisCache(
        cfg.url,
        ttl_s=cfg.ttl_s,
        fail_mode=cfg.fail_mode,
        namespace=cfg.namespace,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        cooldown_s=cfg.cooldown_s,
        command_deadline_s=getattr(cfg, "command_deadline_s", None),
        max_entry_bytes=getattr(cfg, "max_entry_bytes", DEFAULT_MAX_ENTRY_BYTES),
        allow_unsigned=getattr(cfg, "allow_unsigned", False),
    )
