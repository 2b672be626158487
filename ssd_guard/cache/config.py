"""The cache a policy's ``cache:`` section describes (:func:`cache_from_config`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ssd_guard.cache.memory import MemoryCache
from ssd_guard.cache.redis_cache import DEFAULT_MAX_ENTRY_BYTES, RedisCache

if TYPE_CHECKING:
    from ssd_guard.policy import CacheConfig


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
