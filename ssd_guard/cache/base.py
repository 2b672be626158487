"""The score cache protocol: what the guard needs of a cache (sync and async twins), and
the async side of a cache that never waits (:class:`InProcessAsync`)."""

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


class InProcessAsync:
    """The async twins of a cache whose operations never wait on I/O (an in-process
    store): each calls its sync side."""

    def get(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        raise NotImplementedError

    def set(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        raise NotImplementedError

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        raise NotImplementedError

    async def aget(self, key: str) -> dict[str, Any] | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return self.get_many(keys)

    async def aset(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        self.set(key, value, ttl_s)

    async def aset_many(self, items: Items, ttl_s: float | None = None) -> None:
        self.set_many(items, ttl_s)
