"""The in-process score cache: a thread-safe LRU with optional TTL."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ssd_guard.cache.base import InProcessAsync
from ssd_guard.cache.keys import make_key
from ssd_guard.cache.leases import Poll
from ssd_guard.cache.values import Items, _check_ttl, _Codec, _secret


class MemoryCache(InProcessAsync):
    """Thread-safe in-process LRU with optional TTL (monotonic clock, injectable).

    Values are validated like :class:`RedisCache`'s; they are signed only when *hmac_key*
    is given (an in-process cache is not shared, so the environment key is not read).

    Leases (:mod:`ssd_guard.cache.leases`) let the threads of one process that share this
    cache score each prompt once."""

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
        self._leases: dict[str, float] = {}  # key -> when its lease expires

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

    # -- leases ----------------------------------------------------------------------------
    def _leased(self, key: str, now: float) -> bool:
        expires = self._leases.get(key)
        if expires is None:
            return False
        if expires <= now:
            del self._leases[key]
            return False
        return True

    def claim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]:
        if not ttl_s > 0:
            raise ValueError(f"a lease needs ttl_s > 0, got {ttl_s!r}")
        out: list[bool] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                won = not self._leased(key, now)
                if won:
                    self._leases[key] = now + ttl_s
                out.append(won)
        return out

    def release_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._leases.pop(key, None)

    def poll_many(self, keys: Sequence[str]) -> list[Poll]:
        with self._lock:
            now = self._clock()
            raws = [(self._get_raw(k, now), self._leased(k, now)) for k in keys]
        return [(self._codec.decode(r, k), held) for k, (r, held) in zip(keys, raws, strict=True)]

    async def aclaim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]:
        return self.claim_many(keys, ttl_s)

    async def arelease_many(self, keys: Sequence[str]) -> None:
        self.release_many(keys)

    async def apoll_many(self, keys: Sequence[str]) -> list[Poll]:
        return self.poll_many(keys)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._leases.clear()

    def close(self) -> None:
        """Nothing to release; the entries stay usable."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"MemoryCache(max_entries={self.max_entries}, ttl_s={self.ttl_s})"
