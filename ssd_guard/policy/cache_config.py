"""The ``cache:`` section of a policy (:class:`CacheConfig`) and its URL check."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from ssd_guard.policy.fields import Name, _Model
from ssd_guard.policy.vocabulary import MAX_TTL_S


def _cache_url(value: str) -> str:
    if value == "memory":
        return value
    reason = (
        "expected 'memory' or a redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] "
        f"or unix:///PATH URL, got {value!r}"
    )
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError when out of range / not a number
    except ValueError as exc:
        raise ValueError(f"{reason} ({exc})") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(f"{reason} (no host)")
        if port == 0:
            raise ValueError(f"{reason} (port 0)")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"{reason} (database {db!r} is not a number)")
        return value
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{reason} (no socket path)")
        return value
    raise ValueError(reason)


class CacheConfig(_Model):
    """Where scores are cached, keyed by student fingerprint, model, layer and text."""

    url: Annotated[str, AfterValidator(_cache_url)] = "memory"
    """``memory`` (in-process LRU) or ``redis://``, ``rediss://``, ``unix://`` URL."""
    ttl_s: int = Field(default=86_400, gt=0, le=MAX_TTL_S)
    """Time-to-live of an entry, seconds (at most :data:`MAX_TTL_S`, ten years)."""
    fail_mode: Literal["open", "closed"] = "open"
    """Redis down: ``open`` = a miss, go on; ``closed`` = raise CacheUnavailableError."""
    namespace: Name = "ssd-guard"
    """Prefix of every key (``namespace:sha256``)."""
    timeout_s: float = Field(default=0.05, gt=0, le=60)
    """Socket connect / read timeout of one Redis command."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts of one Redis command on a connection error / timeout."""
    cooldown_s: float = Field(default=1.0, ge=0, le=3600)
    """After Redis is found down, skip it this long before probing again (circuit breaker)."""
    max_entries: int = Field(default=10_000, gt=0)
    """Capacity of the memory cache (least recently used entries go first)."""
    command_deadline_s: float | None = Field(default=None, gt=0, le=60)
    """Bound on one whole Redis operation, retries included (a Redis trickling bytes counts
    as a timeout); default ``4 * timeout_s + 0.05``."""
    max_entry_bytes: int = Field(default=262_144, ge=1)
    """Most bytes one entry read may transfer (reads use ``GETRANGE``); a larger value
    under a score key is a logged miss."""
    allow_unsigned: bool = False
    """Run a Redis cache without ``SSD_GUARD_CACHE_HMAC_KEY``: it warns when open and is
    refused under ``fail_mode: closed`` unless this is true."""
    single_flight: bool = True
    """When a cache with leases (Redis, memory) is shared by many workers, a key they all
    miss is scored by one of them; the others wait for its entry (see
    :mod:`ssd_guard.cache.leases`)."""
    lease_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    """How long a claim lasts if its holder never releases it (it crashed)."""
    lease_wait_s: float = Field(default=5.0, ge=0, le=600)
    """The longest a worker waits for another's score before scoring it itself."""
