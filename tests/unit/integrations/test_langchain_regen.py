"""guard.wrap(model): a rejected answer is regenerated only by sampling, keywords are
passed only to models that take them, and bind_tools / with_structured_output keep the
guard around the bound model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.guard import decisions_of, make_policy, make_scorer
from helpers.langchain import CountingChat, handler, tool_call
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableLambda
from pydantic import BaseModel
from structlog.testing import capture_logs

from ssd_guard.guard import Guard
from ssd_guard.integrations.langchain import SSDGuard
from ssd_guard.integrations.langchain.runnable import sampling_kwargs


def answer_events(logs: list[Any]) -> list[Any]:
    return [e for e in decisions_of(logs) if e["scope"] == "answer"]


class NoTemperatureChat(GenericFakeChatModel):
    """A chat model with no sampling setting: the guard cannot make it answer otherwise."""

    replies: list[str]
    calls: int = 0

    def __init__(self, *replies: str) -> None:
        super().__init__(messages=iter(()), replies=list(replies))

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[no-untyped-def]
        from langchain_core.outputs import ChatGeneration, ChatResult

        assert not kwargs  # nothing the model does not take
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply))])


# --------------------------------------------------------------------------------------
# Which keywords make a model sample
# --------------------------------------------------------------------------------------
def test_sampling_kwargs_only_for_models_that_take_them() -> None:
    assert sampling_kwargs(RunnableLambda(lambda x: x), {}, 1.0) is None
    assert sampling_kwargs(GenericFakeChatModel(messages=iter(())), {}, 1.0) is None
    assert sampling_kwargs(CountingChat("x"), {}, 0.7) == {"temperature": 0.7}
    assert sampling_kwargs(CountingChat("x").bind(stop=["\n"]), {}, 0.7) == {"temperature": 0.7}

    class Explicit(RunnableLambda):  # type: ignore[type-arg]
        def invoke(self, input: Any, config: Any = None, *, do_sample: bool = False) -> Any:
            return input

    assert sampling_kwargs(Explicit(lambda x: x), {}, 1.0) == {"do_sample": True}


def hf_chat(tiny_lm: Any) -> Any:
    import transformers
    from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline

    if tiny_lm.tokenizer.chat_template is None:
        tiny_lm.tokenizer.chat_template = (
            "{% for m in messages %}{{ m['content'] }}\n{% endfor %}Answer:"
        )
    pipe = transformers.pipeline(
        "text-generation",
        model=tiny_lm.model,
        tokenizer=tiny_lm.tokenizer,
        max_new_tokens=4,
        do_sample=False,
    )
    return ChatHuggingFace(
        llm=HuggingFacePipeline(pipeline=pipe), tokenizer=tiny_lm.tokenizer, model_id="tiny"
    )


def test_sampling_kwargs_of_a_hugging_face_pipeline(tiny_lm: Any, one_thread: None) -> None:
    chat = hf_chat(tiny_lm)
    # ChatHuggingFace has a temperature field, but its pipeline ignores it: pipeline_kwargs
    assert sampling_kwargs(chat, {}, 1.0) == {
        "pipeline_kwargs": {"do_sample": True, "temperature": 1.0}
    }
    bound = chat.bind(pipeline_kwargs={"max_new_tokens": 2})
    assert sampling_kwargs(bound, {"pipeline_kwargs": {"top_k": 5}}, 0.5) == {
        "pipeline_kwargs": {"max_new_tokens": 2, "top_k": 5, "do_sample": True, "temperature": 0.5}
    }


# --------------------------------------------------------------------------------------
# Regeneration through wrap()
# --------------------------------------------------------------------------------------
def test_greedy_hugging_face_pipeline_regenerates_by_sampling(
    tiny_lm: Any, one_thread: None
) -> None:
    chat = hf_chat(tiny_lm)
    draft = str(chat.invoke("easy").content)
    assert str(chat.invoke("easy").content) == draft  # greedy: the same draft every time
    guard = SSDGuard(make_scorer(loglik={draft: -9.5}), make_policy())
    torch.manual_seed(0)
    with capture_logs() as logs:
        out = guard.wrap(chat).invoke("easy")
    meta = out.response_metadata["ssd_guard"]
    assert meta["rejected"] == [draft] and meta["generations"] == 2
    assert out.content != draft and meta["action"] == "allow"  # the sample was accepted
    events = answer_events(logs)
    assert [e["action"] for e in events] == ["reject_answer", "allow"]
    assert events[0]["regeneration"] == "sample" and events[1]["attempt"] == 1


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
async def test_runnable_lambda_gets_no_temperature_and_is_not_called_again(mode: str) -> None:
    calls: list[Any] = []

    def answer(x: Any) -> str:
        calls.append(x)
        return "bad answer"

    guarded = handler().wrap(RunnableLambda(answer))
    with capture_logs() as logs:
        if mode == "invoke":
            out = guarded.invoke("easy")
        else:
            out = await guarded.ainvoke("easy")
    assert len(calls) == 1 and out.content == "ABSTAIN"  # no TypeError, no second call
    (event,) = answer_events(logs)
    assert event["action"] == "abstain" and event["rule"] == "unlikely"
    assert event["regeneration"] == "skipped-no-sampling"
    meta = out.response_metadata["ssd_guard"]
    assert meta["action"] == "abstain" and meta["rejected"] == ["bad answer"]


def test_runnable_lambda_accepted_answer_passes() -> None:
    out = handler().wrap(RunnableLambda(lambda x: "good answer")).invoke("easy")
    assert out.content == "good answer"


async def test_a_chat_model_without_temperature_is_not_regenerated() -> None:
    model = NoTemperatureChat("bad answer", "good answer")
    assert sampling_kwargs(model, {}, 1.0) is None
    with capture_logs() as logs:
        out = handler().wrap(model).invoke("easy")
    assert model.calls == 1 and out.content == "ABSTAIN"
    assert [e["action"] for e in answer_events(logs)] == ["abstain"]
    aout = await handler().wrap(NoTemperatureChat("bad answer", "good answer")).ainvoke("easy")
    assert aout.content == "ABSTAIN"


def test_a_chat_model_with_temperature_regenerates_at_the_regen_temperature() -> None:
    model = CountingChat("bad answer", "good answer")
    guard = SSDGuard(guard=Guard(make_scorer(), make_policy(), regen_temperature=0.6))
    out = guard.wrap(model).invoke("easy")
    assert out.content == "good answer" and model.temperatures == [None, 0.6]


def test_regen_temperature_zero_does_not_regenerate() -> None:
    model = CountingChat("bad answer", "good answer")
    guard = SSDGuard(guard=Guard(make_scorer(), make_policy(), regen_temperature=0))
    assert guard.wrap(model).invoke("easy").content == "ABSTAIN" and model.calls == 1


# --------------------------------------------------------------------------------------
# bind_tools / with_structured_output
# --------------------------------------------------------------------------------------
class City(BaseModel):
    """The answer."""

    name: str


def test_bind_tools_keeps_the_guard_and_skips_the_answer_check_of_a_tool_call() -> None:
    model = CountingChat(tool_call("search"))
    guarded = handler().wrap(model).bind_tools([City])
    assert type(guarded).__name__ == "GuardedChatModel" and guarded.model is model
    with capture_logs() as logs:
        out = guarded.invoke("easy")
    assert isinstance(out, AIMessage) and out.tool_calls[0]["name"] == "search"
    assert [e["scope"] for e in decisions_of(logs)] == ["prompt"]
    (skip,) = [e for e in logs if e["event"] == "guard.answer.unchecked"]
    assert skip["output_type"] == "AIMessage"
    assert guarded.invoke("hard").content == "ABSTAIN" and model.calls == 1


async def test_with_structured_output_returns_the_parsed_object() -> None:
    reply = AIMessage(
        content="", tool_calls=[{"name": "City", "args": {"name": "Paris"}, "id": "1"}]
    )
    model = CountingChat(reply)
    guarded = handler().wrap(model).with_structured_output(City)
    with capture_logs() as logs:
        out = guarded.invoke("easy")
    assert out == City(name="Paris")
    assert [e["scope"] for e in decisions_of(logs)] == ["prompt"]
    assert [e["event"] for e in logs if e["event"] == "guard.answer.unchecked"] == [
        "guard.answer.unchecked"
    ]
    assert await guarded.ainvoke("easy") == City(name="Paris")
    assert list(guarded.stream("easy")) == [City(name="Paris")]
    abstained = guarded.invoke("hard")  # the prompt check still acts
    assert isinstance(abstained, AIMessage) and abstained.content == "ABSTAIN"
    assert model.calls == 3


def test_pass_through_of_a_model_without_the_method_is_clear() -> None:
    guarded = handler().wrap(RunnableLambda(lambda x: "good answer"))
    with pytest.raises(NotImplementedError, match="with_structured_output"):
        guarded.with_structured_output(City)
