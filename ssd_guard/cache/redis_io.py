"""Redis socket I/O: the errors that count as an outage, and per-command deadlines on the
sync client's sockets (so a trickling reply cannot outlast ``command_deadline_s``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.connection

#: Errors that mean "Redis is unreachable or too slow" and are worth a retry.
_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
    asyncio.TimeoutError,
)
#: Every error that counts as "the cache is unavailable".
_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, *_TRANSIENT)


class _DeadlineExceeded(redis.TimeoutError):
    """A command ran past its overall deadline (``command_deadline_s``); never retried."""


#: When the sync socket I/O of the current command attempt must end (None: unbounded).
_IO_DEADLINE: ContextVar[float | None] = ContextVar("ssd_guard_cache_io_deadline", default=None)


class _DeadlineSocket:
    """The socket of a sync Redis connection, each read / write of which ends by
    :data:`_IO_DEADLINE`: the socket timeout bounds the wait for *each* chunk, so a server
    sending one byte every 30 ms would otherwise hold a reply for as long as it likes.
    Before a ``recv`` / ``recv_into`` / ``sendall`` the timeout is lowered to the time left
    (and restored after); past the deadline the call raises :class:`TimeoutError`
    (``socket.timeout``), which redis-py turns into a :class:`redis.TimeoutError`, dropping
    the connection (its reply half read). Everything else is the wrapped socket's."""

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def _bounded(self, call: Callable[..., Any], *args: Any) -> Any:
        deadline = _IO_DEADLINE.get()
        if deadline is None:
            return call(*args)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("cache command deadline exceeded")  # socket.timeout
        timeout = self._sock.gettimeout()
        if timeout is not None and timeout <= left:  # includes 0.0: a non-blocking poll
            return call(*args)
        self._sock.settimeout(left)
        try:
            return call(*args)
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(timeout)

    def recv(self, *args: Any) -> Any:
        return self._bounded(self._sock.recv, *args)

    def recv_into(self, *args: Any) -> Any:
        return self._bounded(self._sock.recv_into, *args)

    def sendall(self, *args: Any) -> Any:
        return self._bounded(self._sock.sendall, *args)


@functools.cache
def _deadline_connection(base: type[Any]) -> type[Any]:
    """redis-py's connection class *base* (TCP, TLS or unix socket), its socket wrapped in a
    :class:`_DeadlineSocket` (TLS: the wrapped TLS socket, so the handshake is unchanged)."""

    def _connect(self: Any) -> Any:
        return _DeadlineSocket(base._connect(self))

    return type(f"Deadline{base.__name__}", (base,), {"_connect": _connect, "__module__": __name__})


def _connection_class(url: str) -> type[Any]:
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        return _deadline_connection(redis.connection.SSLConnection)
    if scheme == "unix":
        return _deadline_connection(redis.connection.UnixDomainSocketConnection)
    return _deadline_connection(redis.connection.Connection)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError | OSError):
        return "connection"
    return "error"


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return url
