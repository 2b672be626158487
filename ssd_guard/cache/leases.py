"""Single-flight scoring across processes: short leases beside the score entries.

Many workers guarding the same prompts through one cache would each score a prompt they
all miss at once. With leases, the first worker to miss a key *claims* it (``SET
key:lease token NX PX ttl`` in Redis; a dict under the lock in memory), scores it, writes
the entry and releases the lease; the others see the claim fail and *poll* the key (its
value, and whether it is still leased) until the value arrives, the lease is gone (the
holder failed or its score was not cacheable) or their wait runs out -- then they score
it themselves. So a worker that dies holding a lease costs the others at most the lease's
TTL, never a hang, and a lost lease costs a duplicate score, never a wrong one (values
are validated and signed as always; a lease holds no score).

A failing Redis degrades like every other command: in ``fail_mode="open"`` a claim counts
as won and a poll as "gone", so each worker scores for itself.

The guard uses leases when its cache has them (:class:`LeasingCache`) and the policy's
``cache.single_flight`` is on (the default)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["LEASE_SUFFIX", "LeasingCache", "Poll", "lease_key", "lease_token"]

#: What a lease key adds to the score key it guards (``namespace:sha256:lease``).
LEASE_SUFFIX = ":lease"

Poll = tuple[dict[str, Any] | None, bool]
"""One polled key: its valid value (``None``: none yet) and whether it is still leased."""


def lease_key(key: str) -> str:
    """The lease key beside score key *key* (same namespace, so ``clear()`` drops both)."""
    return key + LEASE_SUFFIX


def lease_token() -> str:
    """A random token naming one cache instance's leases."""
    return secrets.token_hex(16)


@runtime_checkable
class LeasingCache(Protocol):
    """A score cache that can lease keys (sync and async twins)."""

    def claim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]:
        """Claim each key for *ttl_s* seconds; ``True`` where this caller got it."""
        ...

    def release_many(self, keys: Sequence[str]) -> None:
        """Drop the leases of *keys* (after their entries are written, or on failure)."""
        ...

    def poll_many(self, keys: Sequence[str]) -> list[Poll]:
        """Each key's valid value and whether it is still leased, in one round trip."""
        ...

    async def aclaim_many(self, keys: Sequence[str], ttl_s: float) -> list[bool]: ...

    async def arelease_many(self, keys: Sequence[str]) -> None: ...

    async def apoll_many(self, keys: Sequence[str]) -> list[Poll]: ...
