"""The Redis score cache: validated (optionally signed) values, bounded reads, and each
operation written once as a flow driven sync or async."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import redis
import redis.asyncio as aredis
import structlog
from redis.backoff import NoBackoff

from ssd_guard import _flow as flow
from ssd_guard._flow import Flow
from ssd_guard.cache.keys import make_key
from ssd_guard.cache.leases import lease_token
from ssd_guard.cache.redis_commands import _RedisCommands
from ssd_guard.cache.redis_io import _ERRORS, _IO_DEADLINE, _connection_class, _redact
from ssd_guard.cache.redis_leases import _RedisLeases
from ssd_guard.cache.values import (
    DEFAULT_MAX_ENTRY_BYTES,
    HMAC_KEY_ENV,
    Items,
    UnsignedCacheWarning,
    _check_ttl,
    _Codec,
    _env_secret,
    _secret,
)
from ssd_guard.errors import ConfigError

_log = structlog.get_logger("ssd_guard.cache")


class RedisCache(_RedisLeases, _RedisCommands):
    """Score cache in Redis (plain string commands: ``SET key json EX ttl``, ``MGET``,
    pipelined ``SET`` for batches), with sync (``redis.Redis``) and async
    (``redis.asyncio.Redis``, one client per event loop) connection pools.

    Each command gets *timeout_s* socket / connect timeouts and up to *retries* extra
    attempts (tenacity) on connection errors and timeouts. See :mod:`ssd_guard.cache` for
    what happens when Redis is down. Each operation is written once, as a flow of
    :class:`Call` effects (:meth:`_op`: circuit breaker, retries, fail mode), driven by the
    sync method with :func:`~ssd_guard._flow.run` and by the async one with
    :func:`~ssd_guard._flow.arun`.

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

    Leases (``claim_many`` / ``poll_many`` / ``release_many``, see
    :mod:`ssd_guard.cache.leases`) let many workers score each prompt once.
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
        self._lease_token = lease_token()

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
        return flow.run(self._get_flow(key))

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return flow.run(self._get_many_flow(keys))

    def set(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        flow.run(self._set_flow(key, self._encode(key, value), ttl_s))

    def _set_raw(self, key: str, raw: str | bytes, ttl_s: float | None = None) -> None:
        flow.run(self._set_flow(key, raw, ttl_s))

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        flow.run(self._set_many_flow(items, ttl_s))

    def delete(self, key: str) -> None:
        flow.run(self._op("delete", lambda c: c.delete(key), None))

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

        flow.run(self._op("clear", wipe, None, bounded=False))

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
        return await flow.arun(self._get_flow(key))

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return await flow.arun(self._get_many_flow(keys))

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        await flow.arun(self._set_flow(key, self._encode(key, value), ttl_s))

    async def aset_many(self, items: Items, ttl_s: float | None = None) -> None:
        await flow.arun(self._set_many_flow(items, ttl_s))

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
