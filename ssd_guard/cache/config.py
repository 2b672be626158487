"""The cache a policy's ``cache:`` section describes (:func:`cache_from_config`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssd_guard.cache.memory import MemoryCache

if TYPE_CHECKING:
    from ssd_guard.cache.redis_cache import RedisCache
    from ssd_guard.policy import CacheConfig


#: The ``cache:`` settings a :class:`~ssd_guard.cache.RedisCache` takes as they are.
_REDIS_OPTIONS = (
    "ttl_s",
    "fail_mode",
    "namespace",
    "timeout_s",
    "retries",
    "cooldown_s",
    "command_deadline_s",
    "max_entry_bytes",
    "allow_unsigned",
)


def cache_from_config(cfg: CacheConfig) -> MemoryCache | RedisCache:
    """The cache a policy's ``cache:`` section describes."""
    if cfg.url == "memory":
        return MemoryCache(cfg.max_entries, cfg.ttl_s, namespace=cfg.namespace)
    from ssd_guard.cache import _redis_cache_class  # needs the [redis] extra (named if not)

    # (an option the config lacks keeps the RedisCache default)
    options = {k: getattr(cfg, k) for k in _REDIS_OPTIONS if hasattr(cfg, k)}
    return _redis_cache_class()(cfg.url, **options)
