"""Bad arguments raise GuardInputError (an SSDGuardError) that
names the argument -- never a raw AttributeError / TypeError / UnicodeEncodeError, and a
single string where a list is expected is never split into characters."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from ssd_guard.errors import GuardInputError, SSDGuardError
from ssd_guard.guard import Guard
from ssd_guard.policy import Policy
from ssd_guard.testing import FakeScorer, ScriptedGenerator

POLICY = Policy.from_yaml_text(
    """
version: 1
name: inputs
abstain_message: ABSTAIN
default_action: allow
rules:
  - name: uncertain
    scope: prompt
    when: {entropy: {gt: 1.5}}
    action: retrieve
    k: 3
  - name: poisoned
    scope: document
    when: {loglik: {lt: -8}}
    action: flag_poisoned
"""
)
HAMLET = "Hamlet is a play by William Shakespeare."
BAD_TEXTS: list[tuple[Any, str]] = [
    (None, "got NoneType"),
    (42, "got int"),
    (b"What is X?", "got bytes (decode bytes to str first)"),
    ("What is \ud800X?", "lone surrogate '\\ud800' at index 8"),
]


def make_guard(**kw: Any) -> tuple[Guard, FakeScorer]:
    scorer = FakeScorer({"medium": 2.0}, default_entropy=0.2, default_loglik=-1.0)
    return Guard(scorer, POLICY, **kw), scorer


def no_decisions(logs: list[Any]) -> bool:
    return not [e for e in logs if e["event"] == "guard.decision"]


# ---------------------------------------------------------------------------- item 8
def test_documents_as_a_single_string_is_an_error_not_characters() -> None:
    guard, scorer = make_guard()
    gen = ScriptedGenerator("an answer")
    with capture_logs() as logs, pytest.raises(GuardInputError) as info:
        guard.run("What is Hamlet?", gen, documents=HAMLET)
    assert info.value.argument == "documents"
    assert isinstance(info.value, SSDGuardError)
    assert "documents must be a list of str, got a single str" in str(info.value)
    assert gen.calls == 0 and scorer.calls == 0 and no_decisions(logs)
    # the intended call works: one document, one document decision
    with capture_logs() as logs:
        res = guard.run("What is Hamlet?", gen, documents=[HAMLET])
    assert res.documents == [HAMLET]
    assert [e["scope"] for e in logs if e["event"] == "guard.decision"] == [
        "document",
        "prompt",
        "answer",
    ]


@pytest.mark.parametrize("documents", [HAMLET, b"bytes", {"a": "b"}, 7])
async def test_bad_documents_async(documents: Any) -> None:
    guard, _ = make_guard()
    with pytest.raises(GuardInputError) as info:
        await guard.arun("q", ScriptedGenerator("a"), documents=documents)
    assert info.value.argument == "documents"


def test_document_checks_refuse_a_single_string() -> None:
    guard, scorer = make_guard()
    for call in (guard.check_documents, guard.screen_documents):
        with pytest.raises(GuardInputError) as info:
            call("q", HAMLET)
        assert info.value.argument == "docs"
    with pytest.raises(GuardInputError) as info:
        guard.check_documents("q", [HAMLET, None])  # type: ignore[list-item]
    assert info.value.argument == "docs[1]"
    assert scorer.calls == 0


async def test_async_document_checks_refuse_a_single_string() -> None:
    guard, _ = make_guard()
    for call in (guard.acheck_documents, guard.ascreen_documents):
        with pytest.raises(GuardInputError, match="single str"):
            await call("q", HAMLET)


def test_documents_as_tuple_or_generator_still_work() -> None:
    guard, _ = make_guard()
    res = guard.run("q", ScriptedGenerator("a"), documents=(HAMLET,))
    assert res.documents == [HAMLET]
    docs = (d for d in [HAMLET, "x"])
    res = guard.run("q", ScriptedGenerator("a"), documents=docs)  # type: ignore[arg-type]
    assert res.documents == [HAMLET, "x"]


def test_tags_as_a_single_string_is_an_error() -> None:
    guard, _ = make_guard()
    with pytest.raises(GuardInputError) as info:
        guard.check_prompt("q", tags="production")
    assert info.value.argument == "tags"
    with pytest.raises(GuardInputError) as info:
        guard.run("q", ScriptedGenerator("a"), run_name=5)  # type: ignore[arg-type]
    assert info.value.argument == "run_name"


def test_a_retriever_returning_a_string_is_an_error() -> None:
    guard, _ = make_guard(retriever=lambda q: HAMLET)
    with pytest.raises(GuardInputError) as info:
        guard.run("medium", ScriptedGenerator("a"))
    assert info.value.argument == "retriever result"
    assert "list of documents, got str" in str(info.value)


async def test_an_async_retriever_returning_a_string_is_an_error() -> None:
    async def retriever(q: str) -> Any:
        return HAMLET

    guard, _ = make_guard(aretriever=retriever)
    with pytest.raises(GuardInputError, match="retriever"):
        await guard.arun("medium", ScriptedGenerator("a"))


# ---------------------------------------------------------------------------- item 11
@pytest.mark.parametrize(("prompt", "message"), BAD_TEXTS)
def test_bad_prompts_name_the_argument(prompt: Any, message: str) -> None:
    guard, scorer = make_guard()
    gen = ScriptedGenerator("a")
    calls = [
        lambda: guard.run(prompt, gen),
        lambda: guard.prepare(prompt),
        lambda: guard.check_prompt(prompt),
        lambda: guard.check_answer(prompt, "a"),
        lambda: guard.check_documents(prompt, ["d"]),
    ]
    for call in calls:
        with capture_logs() as logs, pytest.raises(GuardInputError) as info:
            call()
        assert info.value.argument == "prompt"
        assert str(info.value).startswith("prompt ") and message in str(info.value)
        assert no_decisions(logs)
    assert gen.calls == 0 and scorer.calls == 0


@pytest.mark.parametrize(("prompt", "message"), BAD_TEXTS)
async def test_bad_prompts_name_the_argument_async(prompt: Any, message: str) -> None:
    guard, _ = make_guard()
    for coro in (
        guard.arun(prompt, ScriptedGenerator("a")),
        guard.aprepare(prompt),
        guard.acheck_prompt(prompt),
    ):
        with pytest.raises(GuardInputError, match="prompt") as info:
            await coro
        assert message in str(info.value)


@pytest.mark.parametrize(("answer", "message"), BAD_TEXTS)
def test_bad_answers_name_the_argument(answer: Any, message: str) -> None:
    guard, _ = make_guard()
    with pytest.raises(GuardInputError) as info:
        guard.check_answer("q", answer)
    assert info.value.argument == "answer" and message in str(info.value)


def test_a_generated_lone_surrogate_is_a_clear_error() -> None:
    guard, _ = make_guard()
    with pytest.raises(GuardInputError) as info:
        guard.run("q", lambda p: "broken \udc80 text")
    assert info.value.argument == "answer"


def test_bad_documents_items_name_their_index() -> None:
    guard, _ = make_guard()
    with pytest.raises(GuardInputError) as info:
        guard.run("q", ScriptedGenerator("a"), documents=["fine", "bad \ud83d"])
    assert info.value.argument == "documents[1]" and "lone surrogate" in str(info.value)


def test_input_error_is_also_a_value_error() -> None:
    guard, _ = make_guard()
    with pytest.raises(ValueError):
        guard.check_prompt(None)  # type: ignore[arg-type]
