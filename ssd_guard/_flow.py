"""Flows: each operation written once, run by a sync or an async driver.

Used by the guard, the Redis cache and the LangChain integration.

A *flow* is a generator that yields what it needs done and gets the result back, the way
httpx writes its auth flows once:

``yield Call(sync, async_)``
    the sync driver returns ``sync()``; the async driver awaits ``async_()`` (or, when
    there is no ``async_``, calls ``sync()`` and awaits the result if it is awaitable,
    e.g. a LangChain run manager's ``on_chain_end`` or a middleware ``handler``). An
    exception raised there is thrown into the flow at the ``yield``.
``yield Emit(value)``
    a streamed value for the caller (:func:`iterate` / :func:`aiterate`).

The flow's ``return`` value is the result (:func:`run` / :func:`arun`). Flows never hold a
context variable across a ``yield`` (each :class:`Call` binds what it needs), so a stream
abandoned half-way cannot leave a binding behind in the consumer's context.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["Call", "Emit", "Flow", "aiterate", "arun", "iterate", "run"]

T = TypeVar("T")
R = TypeVar("R")


class Call(Generic[T]):
    """One operation a flow needs done, in the driver's style (see the module doc)."""

    __slots__ = ("async_", "sync")

    def __init__(
        self, sync: Callable[[], T], async_: Callable[[], Awaitable[T]] | None = None
    ) -> None:
        self.sync = sync
        self.async_ = async_

    async def arun(self) -> T:
        if self.async_ is not None:
            return await self.async_()
        out: Any = self.sync()
        if inspect.isawaitable(out):
            out = await out
        return out  # type: ignore[no-any-return]


class Emit:
    """A value the flow streams to its caller."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


Flow = Generator[Call[Any] | Emit, Any, R]


class _Cursor(Generic[R]):
    """Where a driver is in its flow: the next operation, given the last one's outcome."""

    __slots__ = ("error", "flow", "result", "value")

    def __init__(self, flow: Flow[R], result: list[R] | None) -> None:
        self.flow, self.result = flow, result
        self.value: Any = None
        self.error: Exception | None = None

    def next(self) -> Call[Any] | Emit | None:
        """Resume the flow with the last outcome; ``None`` once it has returned (its value
        appended to *result*)."""
        value, error, self.value, self.error = self.value, self.error, None, None
        try:
            return self.flow.throw(error) if error is not None else self.flow.send(value)
        except StopIteration as stop:
            if self.result is not None:
                self.result.append(stop.value)
            return None


def iterate(flow: Flow[R], result: list[R] | None = None) -> Iterator[Any]:
    """Drive *flow* synchronously: yield what it emits; its return value is appended to
    *result*. An exception raised by a :class:`Call` is thrown into the flow, which may
    clean up and re-raise."""
    cur = _Cursor(flow, result)
    try:
        while (op := cur.next()) is not None:
            if isinstance(op, Emit):
                yield op.value
                continue
            try:
                cur.value = op.sync()
            except Exception as exc:
                cur.error = exc
    finally:
        flow.close()


async def aiterate(flow: Flow[R], result: list[R] | None = None) -> AsyncIterator[Any]:
    """:func:`iterate` for the async driver (each :class:`Call` is awaited)."""
    cur = _Cursor(flow, result)
    try:
        while (op := cur.next()) is not None:
            if isinstance(op, Emit):
                yield op.value
            else:
                try:
                    cur.value = await op.arun()
                except Exception as exc:
                    cur.error = exc
    finally:
        flow.close()


def _emitted(value: Any) -> TypeError:
    return TypeError(f"this flow streams values ({type(value).__name__}); iterate() it instead")


def run(flow: Flow[R]) -> R:
    """Drive a flow that emits nothing synchronously and return its result."""
    box: list[R] = []
    for value in iterate(flow, box):
        raise _emitted(value)
    return box[0]


async def arun(flow: Flow[R]) -> R:
    """Drive a flow that emits nothing asynchronously and return its result."""
    box: list[R] = []
    async for value in aiterate(flow, box):
        raise _emitted(value)
    return box[0]
