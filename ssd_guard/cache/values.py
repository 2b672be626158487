"""Cache values: the stored envelope, its validation and its HMAC signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

#: Version of the stored value envelope; entries with another version are misses.
SCHEMA_VERSION = 1
#: Environment variable holding the HMAC key :class:`RedisCache` signs values with.
HMAC_KEY_ENV = "SSD_GUARD_CACHE_HMAC_KEY"

_log = structlog.get_logger("ssd_guard.cache")

Items = Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]]


def _clean_value(value: Any) -> dict[str, float]:
    """*value* as ``{name: finite float}``; TypeError / ValueError naming what is wrong."""
    if not isinstance(value, Mapping):
        raise TypeError(f"cache values must be mappings, got {type(value).__name__}")
    out: dict[str, float] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise TypeError(f"cache value names must be str, got {type(name).__name__}")
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise TypeError(f"cache value {name!r} must be a number, got {type(item).__name__}")
        try:
            number = float(item)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"cache value {name!r} is not finite: {item!r}")
        out[name] = number
    return out


def _signature(secret: bytes, key: str, body: str) -> str:
    message = f"{key}\n{body}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _secret(hmac_key: str | bytes | None) -> bytes | None:
    if hmac_key is None or len(hmac_key) == 0:
        return None
    return hmac_key.encode("utf-8") if isinstance(hmac_key, str) else bytes(hmac_key)


def _env_secret() -> bytes | None:
    return _secret(os.environ.get(HMAC_KEY_ENV))


class _Codec:
    """Encodes / validates (and signs / verifies) the stored envelopes of one cache."""

    def __init__(self, backend: str, secret: bytes | None) -> None:
        self.backend = backend
        self.secret = secret

    def encode(self, key: str, value: Mapping[str, Any]) -> str:
        clean = _clean_value(value)
        envelope: dict[str, Any] = {"v": SCHEMA_VERSION, "value": clean}
        if self.secret is not None:
            envelope["sig"] = _signature(self.secret, key, _canonical(clean))
        return json.dumps(envelope, separators=(",", ":"), allow_nan=False)

    def items(self, items: Items) -> list[tuple[str, str]]:
        pairs = items.items() if isinstance(items, Mapping) else items
        return [(k, self.encode(k, v)) for k, v in pairs]

    def _invalid(self, key: str, reason: str) -> None:
        _log.warning("cache.value.invalid", backend=self.backend, key=key, reason=reason)

    def decode(self, raw: str | bytes | None, key: str) -> dict[str, float] | None:
        if raw is None:
            return None
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            envelope = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._invalid(key, f"undecodable: {exc}")
            return None
        if not isinstance(envelope, dict) or envelope.get("v") != SCHEMA_VERSION:
            version = envelope.get("v") if isinstance(envelope, dict) else None
            self._invalid(key, f"schema version {version!r}, expected {SCHEMA_VERSION}")
            return None
        value = envelope.get("value")
        if not isinstance(value, dict):
            self._invalid(key, "value not a mapping")
            return None
        try:
            clean = _clean_value(value)
        except (TypeError, ValueError) as exc:
            self._invalid(key, str(exc))
            return None
        if self.secret is not None:
            sig = envelope.get("sig")
            if not isinstance(sig, str):
                reason = "missing signature"
            elif not hmac.compare_digest(sig, _signature(self.secret, key, _canonical(clean))):
                reason = "signature mismatch"
            else:
                return clean
            _log.warning("cache.value.bad_signature", backend=self.backend, key=key, reason=reason)
            return None
        if "sig" in envelope:
            # signed by a process that has the key this one lacks (a misconfiguration, or a
            # lost key): never taken for an unsigned value
            _log.warning(
                "cache.value.bad_signature",
                backend=self.backend,
                key=key,
                reason="signed value, but no hmac key is configured to verify it",
            )
            return None
        return clean


def _canonical(value: Mapping[str, float]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")


#: Default :class:`~ssd_guard.cache.RedisCache` ``max_entry_bytes``: a stored score entry is
#: ~100 bytes, so 256 KiB is generous, yet a batch of N keys can never pull more than
#: N x 256 KiB (a longer value is a logged miss, never read whole).
DEFAULT_MAX_ENTRY_BYTES = 256 * 1024


class UnsignedCacheWarning(UserWarning):
    """A :class:`~ssd_guard.cache.RedisCache` runs without an HMAC key: anyone who can
    write to that Redis can forge scores (set ``SSD_GUARD_CACHE_HMAC_KEY``)."""
