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

from typing import TYPE_CHECKING, Any

from ssd_guard.cache.base import ScoreCache
from ssd_guard.cache.config import cache_from_config
from ssd_guard.cache.keys import make_key, normalise_text
from ssd_guard.cache.memory import MemoryCache
from ssd_guard.cache.reporting import collect_errors, report_error
from ssd_guard.cache.values import (
    DEFAULT_MAX_ENTRY_BYTES,
    HMAC_KEY_ENV,
    SCHEMA_VERSION,
    UnsignedCacheWarning,
)
from ssd_guard.cache.values import Items as Items  # the batch type; not in __all__
from ssd_guard.errors import require_extra

if TYPE_CHECKING:  # the real type for type checkers; at run time it loads on first use
    from ssd_guard.cache.redis_cache import RedisCache

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


def _redis_cache_class() -> type[RedisCache]:
    """:class:`RedisCache`, after checking that the ``[redis]`` extra is installed
    (:class:`~ssd_guard.errors.MissingExtraError` naming it otherwise)."""
    require_extra("redis", "redis", "RedisCache")
    require_extra("tenacity", "redis", "RedisCache")
    from ssd_guard.cache import redis_cache

    return redis_cache.RedisCache


def __getattr__(name: str) -> Any:
    # RedisCache loads redis-py on first use, so that the core imports without [redis]
    if name == "RedisCache":
        return _redis_cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
