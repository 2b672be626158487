"""How :class:`~ssd_guard.cache.RedisCache` runs one command: circuit breaker, retries
(tenacity), overall deadline and fail mode, written once as a flow for both drivers."""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import redis
import redis.asyncio as aredis
import structlog
from redis.backoff import NoBackoff
from tenacity import (
    DoAttempt,
    DoSleep,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from ssd_guard._flow import Call, Flow
from ssd_guard.cache.redis_io import (
    _ERRORS,
    _IO_DEADLINE,
    _TRANSIENT,
    _DeadlineExceeded,
    _error_kind,
    _redact,
)
from ssd_guard.cache.reporting import report_error
from ssd_guard.errors import CacheUnavailableError

_log = structlog.get_logger("ssd_guard.cache")


class _RedisCommands:
    """The command runner :class:`~ssd_guard.cache.RedisCache` is built on (its state: the
    attributes below, set by ``RedisCache.__init__``)."""

    backend: str
    url: str
    fail_mode: Literal["open", "closed"]
    timeout_s: float
    retries: int
    cooldown_s: float
    command_deadline_s: float
    _clock: Callable[[], float]
    _client: redis.Redis
    _client_kwargs: dict[str, Any]
    _aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aredis.Redis]
    _state_lock: threading.Lock
    _down: bool
    _down_since: float
    _probe_at: float

    def _admit(self) -> Literal["go", "probe", "skip"]:
        if not self._down:
            return "go"
        with self._state_lock:
            if not self._down:
                return "go"
            now = self._clock()
            if now >= self._probe_at:
                self._probe_at = now + self.cooldown_s
                return "probe"
            return "skip"

    def _unavailable(self, op: str, cause: BaseException | None) -> CacheUnavailableError:
        since = self._clock() - self._down_since if self._down else 0.0
        why = f": {cause}" if cause is not None else f" (down for {since:.1f} s)"
        return CacheUnavailableError(
            f"redis cache at {_redact(self.url)} is unavailable during {op}{why}"
        )

    def _on_failure(self, op: str, exc: BaseException) -> None:
        with self._state_lock:
            now = self._clock()
            self._probe_at = now + self.cooldown_s
            if self._down:
                return
            self._down = True
            self._down_since = now
        _log.warning(
            "cache.redis.unavailable",
            url=_redact(self.url),
            op=op,
            error=f"{type(exc).__name__}: {exc}",
            fail_mode=self.fail_mode,
            cooldown_s=self.cooldown_s,
        )

    def _on_success(self) -> None:
        if not self._down:
            return
        with self._state_lock:
            if not self._down:
                return
            self._down = False
            downtime = self._clock() - self._down_since
        _log.warning("cache.redis.recovered", url=_redact(self.url), downtime_s=round(downtime, 3))

    def _retrying(self, attempts: int) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(attempts),
            "wait": wait_exponential(multiplier=0.005, max=0.05),
            "retry": retry_if_exception_type(_TRANSIENT)
            & retry_if_not_exception_type(_DeadlineExceeded),
            "reraise": True,
        }

    def _op(
        self, op: str, fn: Callable[[Any], Any], fallback: Any, *, bounded: bool = True
    ) -> Flow[Any]:
        """One Redis command, written once for both drivers: ``fn(client)`` on the sync
        client (its result) or the async one (an awaitable), through the circuit breaker,
        with up to ``retries`` retries on transient errors (tenacity; exponential wait:
        5 ms, 10 ms... at most 50 ms; a probe gets one attempt), all of it within
        ``command_deadline_s`` unless *bounded* is false."""
        admit = self._admit()
        if admit == "skip":
            if self.fail_mode == "closed":
                raise self._unavailable(op, None)
            report_error("circuit-open")
            return fallback
        attempts = 1 if admit == "probe" else self.retries + 1
        deadline = time.monotonic() + self.command_deadline_s if bounded else None
        command = Call(
            functools.partial(self._scommand, fn, deadline),
            functools.partial(self._acommand, fn, deadline),
        )
        # tenacity's retry loop (Retrying.__call__), with the attempt and the sleep yielded
        retrying = Retrying(**self._retrying(attempts))
        retrying.begin()
        state = RetryCallState(retrying, fn=None, args=(), kwargs={})
        try:
            while True:
                do = retrying.iter(state)
                if isinstance(do, DoAttempt):
                    try:
                        state.set_result((yield command))
                    except Exception:
                        state.set_exception(sys.exc_info())  # type: ignore[arg-type]
                elif isinstance(do, DoSleep):
                    state.prepare_for_next_attempt()
                    pause = float(do)
                    if deadline is not None:  # the next attempt fails at once if none is left
                        pause = max(0.0, min(pause, deadline - time.monotonic()))
                    yield Call(
                        functools.partial(time.sleep, pause),
                        functools.partial(asyncio.sleep, pause),
                    )
                else:
                    result = do
                    break
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                _log.warning("cache.value.invalid", backend=self.backend, reason=str(exc))
                self._on_success()
                return fallback
            return self._fail(op, exc, fallback)
        except _ERRORS as exc:
            return self._fail(op, exc, fallback)
        self._on_success()
        return result

    def _attempt_deadline(self, deadline: float) -> float:
        """When an attempt started now must end: connect + write + read, each bounded by
        the socket timeout, so ``3 * timeout_s + 0.05``, and never past *deadline*."""
        now = time.monotonic()
        if now >= deadline:
            raise _DeadlineExceeded(self._deadline_message("no time left for another attempt"))
        return min(deadline, now + 3 * self.timeout_s + 0.05)

    def _deadline_message(self, detail: str) -> str:
        return f"command deadline of {self.command_deadline_s:g} s exceeded ({detail})"

    def _check_deadline(self, deadline: float, exc: BaseException) -> None:
        """*exc* ended an attempt: past *deadline*, it ends the whole command."""
        if time.monotonic() >= deadline - 0.001:
            detail = f"{exc}" or type(exc).__name__
            raise _DeadlineExceeded(self._deadline_message(detail)) from exc

    def _scommand(self, fn: Callable[[Any], Any], deadline: float | None) -> Any:
        # the sync client's sockets read the attempt's deadline (_DeadlineSocket)
        if deadline is None:
            return fn(self._client)
        token = _IO_DEADLINE.set(self._attempt_deadline(deadline))
        try:
            return fn(self._client)
        except _TRANSIENT as exc:
            self._check_deadline(deadline, exc)
            raise
        finally:
            _IO_DEADLINE.reset(token)

    async def _acommand(self, fn: Callable[[Any], Any], deadline: float | None) -> Any:
        # a hard upper bound, so a wedged or trickling connection can never stall the event
        # loop's caller for long
        if deadline is None:
            return await asyncio.wait_for(fn(self._aclient()), 3 * self.timeout_s + 0.05)
        left = self._attempt_deadline(deadline) - time.monotonic()
        try:
            return await asyncio.wait_for(fn(self._aclient()), left)
        except _TRANSIENT as exc:
            self._check_deadline(deadline, exc)
            raise

    def _fail(self, op: str, exc: BaseException, fallback: Any) -> Any:
        self._on_failure(op, exc)
        if self.fail_mode == "closed":
            raise self._unavailable(op, exc) from exc
        report_error(_error_kind(exc))
        return fallback

    def _aclient(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = aredis.Redis.from_url(
                self.url, retry=aredis.retry.Retry(NoBackoff(), 0), **self._client_kwargs
            )
            self._aclients[loop] = client
        return client
