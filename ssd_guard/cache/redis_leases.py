"""The leases of :class:`~ssd_guard.cache.RedisCache` (see :mod:`ssd_guard.cache.leases`):
one pipeline per batch, each operation a flow driven sync or async like the others."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

from ssd_guard import _flow as flow
from ssd_guard._flow import Flow
from ssd_guard.cache.leases import Poll, lease_key


class _RedisLeases:
    """Claim / release / poll for :class:`~ssd_guard.cache.RedisCache`."""

    max_entry_bytes: int
    _lease_token: str
    _op: Callable[..., Flow[Any]]
    _decode: Callable[[Any, str], dict[str, Any] | None]

    def _claim_flow(self, keys: Sequence[str], ttl_s: float) -> Flow[list[bool]]:
        keys = list(keys)
        if not keys:
            return []
        if not ttl_s > 0:
            raise ValueError(f"a lease needs ttl_s > 0, got {ttl_s!r}")
        px, token = max(1, round(ttl_s * 1000)), self._lease_token

        def claim(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.set(lease_key(key), token, nx=True, px=px)
            return pipe.execute()

        # Redis failing (fail open): every claim "won", each worker scores for itself
        got = yield from self._op("claim", claim, [True] * len(keys))
        return [bool(g) for g in got]

    def _release_flow(self, keys: Sequence[str]) -> Flow[None]:
        leases = [lease_key(k) for k in keys]
        if leases:
            # (plain DEL: a lease that expired and was claimed again meanwhile is dropped
            # too; its waiters then score for themselves -- a duplicate, never a wrong score)
            yield from self._op("release", lambda c: c.delete(*leases), None)

    def _poll_flow(self, keys: Sequence[str]) -> Flow[list[Poll]]:
        keys = list(keys)
        if not keys:
            return []
        end = self.max_entry_bytes

        def poll(client: Any) -> Any:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 0, end)
                pipe.exists(lease_key(key))
            return pipe.execute(raise_on_error=False)

        # Redis failing (fail open): nothing arrived and nobody holds it: score it here
        raws = yield from self._op("poll", poll, [None, 0] * len(keys))
        out: list[Poll] = []
        for i, key in enumerate(keys):
            raw, leased = raws[2 * i], raws[2 * i + 1]
            value = None if isinstance(raw, redis.ResponseError) else self._decode(raw, key)
            out.append((value, not isinstance(leased, redis.ResponseError) and bool(leased)))
        return out

    def claim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]:
        return flow.run(self._claim_flow(keys, ttl_s))

    def release_many(self, keys: Sequence[str]) -> None:
        flow.run(self._release_flow(keys))

    def poll_many(self, keys: Sequence[str]) -> list[Poll]:
        return flow.run(self._poll_flow(keys))

    async def aclaim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]:
        return await flow.arun(self._claim_flow(keys, ttl_s))

    async def arelease_many(self, keys: Sequence[str]) -> None:
        await flow.arun(self._release_flow(keys))

    async def apoll_many(self, keys: Sequence[str]) -> list[Poll]:
        return await flow.arun(self._poll_flow(keys))
