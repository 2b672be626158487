"""The agent middleware: ``create_agent(model, tools, middleware=[guard.middleware()])``.

* ``before_model``: on a new user turn, checks the prompt; ``abstain`` adds the
  abstention message and ends the run without calling the model; ``retrieve`` fetches
  documents (poisoned ones flagged) for the whole turn.
* ``wrap_model_call``: puts the turn's documents in the request, checks every final text
  answer (not tool calls) and calls the handler again on ``reject_answer`` (at most
  ``max_regenerations`` times, with ``model_settings["temperature"]`` set to the guard's
  ``regen_temperature`` when it samples; then abstains).
* ``wrap_tool_call``: checks tool outputs at document scope (``source: tool``); a flagged
  output is replaced by a quarantine notice (``mode: quarantine`` keeps the original in
  ``artifact["ssd_guard_quarantined"]``).

**Run ids, tags, metadata.** Each hook's checks run in a LangChain run of their own,
named ``SSDGuard``, a child of the hook's node run (so they appear in traces with the
decisions as outputs); its ``run_id`` is the audit's ``run_id``, the node run is the
``parent_run_id``, and the run's tags and metadata (those of the agent's config, plus
LangGraph's ``langgraph_node`` / ``langgraph_step``...) are the audit's ``tags`` and
``metadata``. The model calls of ``wrap_model_call`` are children of its ``SSDGuard`` run.

**Streaming.** When an answer rule can block (see :class:`GuardedChatModel`), the model
call is tagged ``nostream``: ``agent.stream(stream_mode="messages")`` then streams no
token of a draft (a rejected draft is never shown) and emits the checked message (or the
abstention) when the model node ends. The cost is latency: the user sees the answer
only once it is fully generated and checked (plus any regeneration). Without such a rule
the tokens stream as usual.

Each hook is one flow (:mod:`._flow`); the sync and async hooks are its two drivers.
``langchain`` (v1) is an optional extra: this module is imported on first use.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, NotRequired, Protocol, TypeVar

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import (
    ensure_config,
    get_async_callback_manager_for_config,
    get_callback_manager_for_config,
    patch_config,
    set_config_context,
)

from ssd_guard.errors import MissingExtraError

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ModelRequest,
        ModelResponse,
        ToolCallRequest,
        hook_config,
    )
    from langchain.agents.middleware.types import PrivateStateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError(
        "SSDGuardMiddleware (LangChain v1 agents)", "langchain", "langchain.agents.middleware"
    ) from exc

from ssd_guard import _flow as flow
from ssd_guard._flow import Call, Flow
from ssd_guard.guard import CallStats, Guard, GuardResult, RetrievedContext
from ssd_guard.integrations.langchain._common import (
    NOSTREAM_TAG,
    QUARANTINE_NOTICE,
    TURN_KEY,
    RunInfo,
    answer_can_block,
    answer_text,
    decision_from_dict,
    last_human,
    result_message,
    text_of,
    with_prompt,
)

__all__ = ["SSDGuardMiddleware", "SSDGuardState"]

T = TypeVar("T")
#: Name of the LangChain run each hook's checks run in.
GUARD_RUN_NAME = "SSDGuard"
#: How many recent turns keep their statistics (the question's hidden state) in memory.
MAX_TURN_STATS = 1024


class SSDGuardState(AgentState[Any]):
    """Agent state with the guard's per-turn record (private: not in input/output)."""

    ssd_guard_turn: NotRequired[Annotated[dict[str, Any] | None, PrivateStateAttr]]


def _call_in(config: RunnableConfig, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with *config* as the child Runnable config (the model call's parent)."""
    with set_config_context(config) as ctx:
        return ctx.run(fn, *args)


async def _acall_in(config: RunnableConfig, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    with set_config_context(config) as ctx:
        return await asyncio.create_task(fn(*args), context=ctx)  # type: ignore[arg-type]


class _HoldsGuard(Protocol):
    """What the middleware reads of an :class:`SSDGuard` callback."""

    @property
    def guard(self) -> Guard: ...
    @property
    def tags(self) -> Sequence[str]: ...
    @property
    def run_name(self) -> str | None: ...


class SSDGuardMiddleware(AgentMiddleware[SSDGuardState, Any, Any]):
    """SSD guard for ``create_agent(..., middleware=[SSDGuardMiddleware(guard)])``; see the
    module doc. *guard* is a :class:`~ssd_guard.guard.Guard` or an :class:`SSDGuard`
    (whose ``hidden_state_source``, ``tags`` and ``run_name`` are then the defaults).
    *model* (the agent's model) decides ``hidden_state_source`` up front; otherwise it is
    resolved from each request's model."""

    state_schema = SSDGuardState

    def __init__(
        self,
        guard: Guard | _HoldsGuard,
        *,
        model: Any = None,
        hidden_state_source: str | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(guard, Guard):
            core = guard
        else:  # an SSDGuard callback (this module does not import it: no import cycle)
            tags = tuple(tags) or tuple(guard.tags)
            run_name = run_name or guard.run_name
            core = guard.guard
        self.guard = core.for_model(model, source=hidden_state_source)
        self._by_model: dict[int, Guard] = {}
        # The statistics of each recent turn (the question's hidden state), so that the
        # answer and tool-output checks of a turn reuse what its prompt check computed.
        self._turn_stats: OrderedDict[str, CallStats] = OrderedDict()
        self._turn_stats_lock = threading.Lock()
        self._last: Guard | None = None
        self.tags = tuple(tags)
        self.run_name = run_name

    @property
    def name(self) -> str:
        return "SSDGuardMiddleware"

    # -- hooks: one flow each, a sync and an async driver ----------------------------------
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return flow.run(self._before_model(state))

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        return await flow.arun(self._before_model(state))

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        out: ModelResponse[Any] | AIMessage = flow.run(self._model_call(request, handler, _call_in))
        return out

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        out: ModelResponse[Any] | AIMessage = await flow.arun(
            self._model_call(request, handler, _acall_in)
        )
        return out

    def wrap_tool_call(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Any:
        return flow.run(self._tool_call(request, handler))

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[..., Awaitable[Any]]
    ) -> Any:
        return await flow.arun(self._tool_call(request, handler))

    # -- the flows -------------------------------------------------------------------------
    def _in_run(
        self,
        inputs: dict[str, Any],
        body: Callable[[RunInfo, Any, RunnableConfig], Flow[T]],
        outputs: Callable[[T], dict[str, Any]],
    ) -> Flow[T]:
        """Run *body* in an ``SSDGuard`` LangChain run, child of the current node's run."""
        config = ensure_config()
        run_manager = yield Call(
            lambda: get_callback_manager_for_config(config).on_chain_start(
                None, inputs, name=GUARD_RUN_NAME
            ),
            lambda: get_async_callback_manager_for_config(config).on_chain_start(
                None, inputs, name=GUARD_RUN_NAME
            ),
        )
        info = RunInfo.of_run(run_manager, extra_tags=self.tags, run_name=self.run_name)
        try:
            out = yield from body(info, run_manager, config)
        except Exception as exc:
            yield Call(functools.partial(run_manager.on_chain_error, exc))
            raise
        yield Call(lambda: run_manager.on_chain_end(outputs(out)))
        return out

    def _before_model(self, state: Any) -> Flow[dict[str, Any] | None]:
        messages = state.get("messages", []) if isinstance(state, Mapping) else []
        new = self._new_turn(messages)
        if new is None or self._current_turn(state, messages) is not None:
            return None
        index, prompt = new
        guard = self._last or self.guard

        def body(info: RunInfo, _rm: Any, _config: RunnableConfig) -> Flow[GuardResult]:
            res: GuardResult = yield info.call(
                lambda: guard.prepare(prompt, **info.run_kw),
                lambda: guard.aprepare(prompt, **info.run_kw),
            )
            return res

        res = yield from self._in_run({"prompt": prompt}, body, _result_outputs)
        if not res.abstained and res.stats is not None:
            self._keep_stats(res.run_id, res.stats)
        update: dict[str, Any] = {TURN_KEY: self._turn(res, messages[index])}
        if res.abstained:
            update["messages"] = [result_message(res)]
            update["jump_to"] = "end"
        return update

    def _model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Any],
        call_in: Callable[..., Any],
    ) -> Flow[Any]:
        guard = self._guard_for_model(request.model)
        turn = self._current_turn(request.state, request.messages)
        new = self._new_turn(request.messages) if turn is None else None
        if turn is None and new is None:  # no user turn seen by the guard: pass through
            return (yield Call(lambda: handler(request)))

        def body(info: RunInfo, run_manager: Any, config: RunnableConfig) -> Flow[GuardResult]:
            if turn is not None:
                res = self._result_from_turn(turn)
                res.stats = self._stats_of_turn(turn)  # the prompt check's hidden state
                req = self._request_with_context(request, turn["prompt"], turn["final_prompt"])
            else:
                assert new is not None
                res = yield info.call(
                    lambda: guard.prepare(new[1], **info.run_kw),
                    lambda: guard.aprepare(new[1], **info.run_kw),
                )
                req = self._request_with_context(request, res.prompt, res.final_prompt)
            res.run_id, res.parent_run_id = info.run_id, info.parent_run_id
            if res.abstained:
                return res
            child = patch_config(config, callbacks=run_manager.get_child())
            if answer_can_block(guard, info.tags, info.run_name):
                child["tags"] = [*(child.get("tags") or []), NOSTREAM_TAG]

            def generate(_prompt: str, temperature: float | None = None) -> Any:
                r = req
                if temperature is not None:
                    r = req.override(
                        model_settings={**req.model_settings, "temperature": temperature}
                    )
                return call_in(child, handler, r)

            done: GuardResult = yield info.call(
                lambda: guard.complete(res, generate, extract=answer_text, **info.kw),
                lambda: guard.acomplete(res, generate, extract=answer_text, **info.kw),
            )
            return done

        inputs = {"prompt": turn["prompt"] if turn is not None else new[1] if new else ""}
        res = yield from self._in_run(inputs, body, _result_outputs)
        if res.abstained:
            return result_message(res)
        return self._annotate(res.raw, res)

    def _tool_call(self, request: ToolCallRequest, handler: Callable[..., Any]) -> Flow[Any]:
        result = yield Call(lambda: handler(request))
        if not isinstance(result, ToolMessage):
            return result
        question, stats = self._tool_question(request)
        text = text_of(result)
        if not question or not text.strip():
            return result
        guard, tool = self.guard, str(request.tool_call.get("name", "?"))
        kw: dict[str, Any] = {"source": "tool", "stats": stats}

        def body(info: RunInfo, _rm: Any, _config: RunnableConfig) -> Flow[RetrievedContext]:
            ctx: RetrievedContext = yield info.call(
                lambda: guard.screen_documents(question, [text], **kw, **info.kw),
                lambda: guard.ascreen_documents(question, [text], **kw, **info.kw),
            )
            return ctx

        ctx = yield from self._in_run(
            {"tool": tool, "output": text},
            body,
            lambda c: {"decisions": [d.to_dict() for d in c.decisions]},
        )
        return self._screen_result(result, ctx, tool)

    # -- helpers ---------------------------------------------------------------------------
    def _guard_for_model(self, model: Any) -> Guard:
        if model is None:
            return self.guard
        key = id(model)
        if key not in self._by_model:
            self._by_model[key] = self.guard.for_model(model)
        # before_model does not see the model: it uses the last one seen here
        self._last = self._by_model[key]
        return self._last

    @staticmethod
    def _new_turn(messages: Sequence[BaseMessage]) -> tuple[int, str] | None:
        if not messages:
            return None
        last = messages[-1]
        if isinstance(last, HumanMessage) or last.type == "human":
            return len(messages) - 1, text_of(last)
        return None

    @staticmethod
    def _turn(res: GuardResult, message: BaseMessage) -> dict[str, Any]:
        return {
            "message_id": message.id,
            "prompt": res.prompt,
            "final_prompt": res.final_prompt,
            "entropy": res.entropy,
            "run_id": res.run_id,
            "parent_run_id": res.parent_run_id,
            "abstained": res.abstained,
            "output": res.output,
            "documents": len(res.documents),
            "quarantined": list(res.quarantined),
            "dropped": res.dropped,
            "decisions": [d.to_dict() for d in res.decisions],
        }

    @staticmethod
    def _current_turn(state: Any, messages: Sequence[BaseMessage]) -> dict[str, Any] | None:
        turn = state.get(TURN_KEY) if isinstance(state, Mapping) else None
        i = last_human(messages)
        if turn is None or i is None:
            return turn
        human = messages[i]
        same = (
            turn.get("message_id") == human.id
            if human.id is not None
            else turn.get("prompt") == text_of(human)
        )
        return turn if same else None

    @staticmethod
    def _result_from_turn(turn: Mapping[str, Any]) -> GuardResult:
        return GuardResult(
            output=turn.get("output") or "",
            abstained=bool(turn.get("abstained")),
            prompt=turn["prompt"],
            final_prompt=turn["final_prompt"],
            run_id=turn["run_id"],
            parent_run_id=turn.get("parent_run_id"),
            entropy=turn.get("entropy"),
            decisions=[decision_from_dict(d) for d in turn.get("decisions", [])],
        )

    @staticmethod
    def _request_with_context(
        request: ModelRequest[Any], prompt: str, final_prompt: str
    ) -> ModelRequest[Any]:
        if final_prompt == prompt:
            return request
        i = last_human(request.messages)
        if i is None:
            return request
        messages: Any = with_prompt(request.messages, i, final_prompt)
        return request.override(messages=messages)

    @staticmethod
    def _annotate(response: Any, res: GuardResult) -> Any:
        msgs = list(getattr(response, "result", []) or [])
        for j in range(len(msgs) - 1, -1, -1):
            if isinstance(msgs[j], AIMessage):
                m = msgs[j]
                msgs[j] = m.model_copy(
                    update={
                        "response_metadata": {**m.response_metadata, "ssd_guard": res.to_dict()}
                    }
                )
                return ModelResponse(result=msgs, structured_response=response.structured_response)
        return response

    def _tool_question(self, request: ToolCallRequest) -> tuple[str | None, CallStats | None]:
        """The question a tool output is checked against, and its turn's statistics."""
        state = request.state if isinstance(request.state, Mapping) else {}
        messages = state.get("messages", [])
        turn = self._current_turn(state, messages)
        if turn is not None:
            return str(turn["prompt"]), self._stats_of_turn(turn)
        i = last_human(messages)
        return (text_of(messages[i]) if i is not None else None), None

    def _keep_stats(self, run_id: str, stats: CallStats) -> None:
        with self._turn_stats_lock:
            self._turn_stats[run_id] = stats
            self._turn_stats.move_to_end(run_id)
            while len(self._turn_stats) > MAX_TURN_STATS:
                self._turn_stats.popitem(last=False)

    def _stats_of_turn(self, turn: Mapping[str, Any]) -> CallStats:
        """The statistics the turn's prompt check computed (a new, empty one when this
        process did not run it, e.g. a turn resumed from a checkpoint elsewhere)."""
        with self._turn_stats_lock:
            stats = self._turn_stats.get(str(turn.get("run_id")))
        return stats if stats is not None else CallStats()

    @staticmethod
    def _screen_result(result: ToolMessage, ctx: RetrievedContext, tool_name: str) -> ToolMessage:
        if not ctx.quarantined and not ctx.dropped:
            return result
        d = ctx.decisions[0]
        loglik = d.scores.get("loglik")
        notice = QUARANTINE_NOTICE.format(
            tool=tool_name,
            rule=d.rule,
            loglik="n/a" if loglik is None else f"{loglik:.3g}",
        )
        update: dict[str, Any] = {
            "content": notice,
            "response_metadata": {**result.response_metadata, "ssd_guard": d.to_dict()},
        }
        if ctx.quarantined:
            update["artifact"] = {"ssd_guard_quarantined": result.content}
        return result.model_copy(update=update)


def _result_outputs(res: GuardResult) -> dict[str, Any]:
    return {"ssd_guard": res.to_dict()}
