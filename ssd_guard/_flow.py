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

__all__ = ["Call", "Emit", "Flow", "adrive", "aiterate", "arun", "drive", "iterate", "run"]

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


def _resume(flow: Flow[R], value: Any, error: Exception | None) -> Call[Any] | Emit:
    return flow.throw(error) if error is not None else flow.send(value)


def iterate(flow: Flow[R], result: list[R] | None = None) -> Iterator[Any]:
    """Drive *flow* synchronously: yield what it emits; its return value is appended to
    *result*."""
    value: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                op = _resume(flow, value, error)
            except StopIteration as stop:
                if result is not None:
                    result.append(stop.value)
                return
            value, error = None, None
            if isinstance(op, Emit):
                yield op.value
                continue
            try:
                value = op.sync()
            except Exception as exc:  # thrown into the flow, which may clean up and re-raise
                error = exc
    finally:
        flow.close()


async def aiterate(flow: Flow[R], result: list[R] | None = None) -> AsyncIterator[Any]:
    """:func:`iterate` for the async driver (each :class:`Call` is awaited)."""
    value: Any = None
    error: Exception | None = None
    try:
        while True:
            try:
                op = _resume(flow, value, error)
            except StopIteration as stop:
                if result is not None:
                    result.append(stop.value)
                return
            value, error = None, None
            if isinstance(op, Emit):
                yield op.value
                continue
            try:
                value = await op.arun()
            except Exception as exc:
                error = exc
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


#: The names the guard and the cache drive their flows with.
drive = run
adrive = arun
