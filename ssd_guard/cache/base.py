"""The score cache protocol: what the guard needs of a cache (sync and async twins)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ssd_guard.cache.values import Items


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
