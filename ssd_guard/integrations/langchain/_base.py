"""The Runnable base of the guard's runnables: ``invoke`` / ``ainvoke`` / ``stream`` /
``astream`` as chain runs, each a thin driver of one flow (:meth:`_GuardRunnable._flow`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.runnables import Runnable, RunnableConfig

from ssd_guard import _flow as flow
from ssd_guard._flow import Flow
from ssd_guard.integrations.langchain._common import RunInfo


@dataclass(frozen=True)
class RunArgs:
    """What one run of a guard runnable's flow gets: the input, the run's config, its
    :class:`RunInfo` and run manager, the caller's extra keyword arguments, and whether
    the caller streams."""

    input: Any
    config: RunnableConfig
    info: RunInfo
    run_manager: Any
    kwargs: dict[str, Any]
    streaming: bool


class _GuardRunnable(Runnable[Any, AIMessage]):
    """``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` over one :meth:`_flow`."""

    tags: tuple[str, ...] = ()

    def _flow(self, run: RunArgs) -> Flow[AIMessage]:
        raise NotImplementedError

    def _start(
        self,
        input_: Any,
        run_manager: Any,
        config: RunnableConfig,
        kwargs: dict[str, Any],
        *,
        streaming: bool,
    ) -> Flow[AIMessage]:
        run_name = kwargs.pop("_ssd_run_name", None)
        info = RunInfo.of_run(run_manager, extra_tags=self.tags, run_name=run_name)
        return self._flow(RunArgs(input_, config, info, run_manager, kwargs, streaming))

    # -- drivers (what LangChain's run wrappers call; ``_ssd_run_name`` rides in *kw*) ----
    def _invoke(
        self, input_: Any, run_manager: Any, config: RunnableConfig, **kw: Any
    ) -> AIMessage:
        return flow.run(self._start(input_, run_manager, config, kw, streaming=False))

    async def _ainvoke(
        self, input_: Any, run_manager: Any, config: RunnableConfig, **kw: Any
    ) -> AIMessage:
        return await flow.arun(self._start(input_, run_manager, config, kw, streaming=False))

    def _transform(
        self, inputs: Iterator[Any], run_manager: Any, config: RunnableConfig, **kw: Any
    ) -> Iterator[AIMessageChunk]:
        input_ = list(inputs)[-1]  # the last input is the one to run
        yield from flow.iterate(self._start(input_, run_manager, config, kw, streaming=True))

    async def _atransform(
        self, inputs: AsyncIterator[Any], run_manager: Any, config: RunnableConfig, **kw: Any
    ) -> AsyncIterator[AIMessageChunk]:
        input_ = [i async for i in inputs][-1]
        async for chunk in flow.aiterate(
            self._start(input_, run_manager, config, kw, streaming=True)
        ):
            yield chunk

    # -- Runnable API ----------------------------------------------------------------------
    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(
            self._invoke,
            input,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )

    async def ainvoke(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AIMessage:
        return await self._acall_with_config(
            self._ainvoke,
            input,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )

    def stream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        chunks = self._transform_stream_with_config(
            iter([input]),
            self._transform,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )
        yield from cast(Iterator[AIMessageChunk], chunks)

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        chunks = self._atransform_stream_with_config(
            _one(input),
            self._atransform,
            config,
            run_type="chain",
            _ssd_run_name=(config or {}).get("run_name"),
            **kwargs,
        )
        async for chunk in cast(AsyncIterator[AIMessageChunk], chunks):
            yield chunk


async def _one(value: Any) -> AsyncIterator[Any]:
    yield value
