"""The demo command and the examples, run with fake models (the real ones: integration)."""

from __future__ import annotations

import argparse
import importlib.util
import io
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers.fakes import FakeScorer
from helpers.langchain import CountingChat
from helpers.paths import EXAMPLES
from helpers.redis_server import redis_binary, redis_server, redis_url  # noqa: F401 - fixtures
from structlog.testing import capture_logs

from ssd_guard.audit import read_events
from ssd_guard.cli_demo import DEMO_QUESTIONS, KeywordRetriever, add_commands, run_demo
from ssd_guard.policy.loading import default_policy_path

# Its fake risk (entropy / 3 = 0.957) is above the default policy's abstain bound (0.9496)
# and between the RAG policy's retrieve (0.9496) and abstain (0.9606) bounds.
HARD = DEMO_QUESTIONS[4].question


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_scorer() -> FakeScorer:
    # calibration (FakeScorer default): entropy 0..3 -> 90 % quantile 2.7;
    # loglik -10..0 -> 5 % quantile -9.5, 2 % quantile -9.8
    return FakeScorer(
        entropy={HARD: 2.87},
        default_entropy=0.5,
        loglik_contains={"IGNORE ALL PREVIOUS": -9.9, "Berlin": -9.7},
        default_loglik=-1.0,
    )


def test_keyword_retriever_finds_the_relevant_documents() -> None:
    retriever = KeywordRetriever()
    for item in DEMO_QUESTIONS:
        docs = retriever(item.question)
        assert docs and any(item.answer.split()[-1].lower() in d.lower() for d in docs)
    assert retriever("zzz qqq") == []


@pytest.mark.parametrize("agent", [False, True])
def test_demo_prints_every_decision(agent: bool, tmp_path: Path) -> None:
    out = io.StringIO()
    log = tmp_path / "audit.jsonl"
    chat = CountingChat("Port")
    rc = run_demo(
        policy=default_policy_path(),
        questions=5,
        audit_log=log,
        out=out,
        scorer=demo_scorer(),
        chat_model=chat,
        agent=agent,
    )
    text = out.getvalue()
    assert rc == 0
    assert text.count("Q: ") == 5 and "1 abstained" in text and "5 questions:" in text
    assert "ABSTAINED" in text and "risky-prompt" in text
    assert "unguarded, the model would have said: Port" in text
    # The risky question never reached the guarded model: one unguarded call shows what
    # it would have said.
    assert chat.calls == 4 + 1
    events = read_events(log)
    assert len(events) == 4 * 2 + 1
    assert {e["hidden_state_source"] for e in events} == {"proxy:fake/base-model"}


def test_demo_runs_the_shipped_rag_policy_by_default(tmp_path: Path) -> None:
    """Without --policy the demo retrieves for risky prompts (what the operating point
    justifies for this model) instead of abstaining."""
    out = io.StringIO()
    chat = CountingChat("Port")
    assert run_demo(questions=5, out=out, scorer=demo_scorer(), chat_model=chat) == 0
    text = out.getvalue()
    assert "policy 'rag'" in text and "retrieve" in text


def test_demo_command_is_registered(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--questions", "2", "--audit-log", "x.jsonl", "--agent"])
    assert (args.questions, args.audit_log, args.agent, args.policy) == (2, "x.jsonl", True, None)
    assert callable(args.func)


def test_agent_loop_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("agent_loop")
    log = tmp_path / "loop.jsonl"
    chat = CountingChat("Port")
    assert (
        example.main(
            ["--questions", "6", "--audit-log", str(log)], scorer=demo_scorer(), chat_model=chat
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("ABSTAINED") == 1 and chat.calls == 5
    assert len(read_events(log)) == 5 * 2 + 1


@pytest.mark.parametrize("quarantine", [False, True])
def test_rag_poisoned_example_flags_the_injection(
    quarantine: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("rag_poisoned")
    prompts: list[str] = []

    def generate(prompt: str) -> str:
        prompts.append(prompt)
        return "Hobart"

    argv = ["--quarantine"] if quarantine else []
    assert example.main(argv, scorer=demo_scorer(), generate=generate) == 0
    printed = capsys.readouterr().out
    assert printed.count("FLAGGED") == 1
    assert len(prompts) == 1 and "IGNORE ALL PREVIOUS" not in prompts[0]
    assert "Hobart, Tasmania" in prompts[0]
    expected = "dropped: 0, quarantined: 1" if quarantine else "dropped: 1, quarantined: 0"
    assert expected in printed


def test_redis_example_second_call_is_a_cache_hit(
    redis_url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example("redis_cache")
    scorer = demo_scorer()
    with capture_logs() as logs:
        assert example.main(["--url", redis_url], scorer=scorer) == 0
    events = [e for e in logs if e["event"] == "guard.decision"]
    assert [e["cache_hit"] for e in events] == [False, False, True, True]
    assert len(scorer.prompt_calls) == 2
    assert "redis healthy: True" in capsys.readouterr().out


def test_redis_example_fail_closed_blocks(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = load_example("redis_cache")
    argv: list[Any] = ["--url", "redis://127.0.0.1:1/0", "--fail-mode", "closed"]
    monkeypatch.delenv("SSD_GUARD_CACHE_HMAC_KEY", raising=False)
    assert example.main(argv, scorer=demo_scorer()) == 2  # closed and unsigned: refused
    assert "SSD_GUARD_CACHE_HMAC_KEY" in capsys.readouterr().err
    monkeypatch.setenv("SSD_GUARD_CACHE_HMAC_KEY", "example-secret")
    assert example.main(argv, scorer=demo_scorer()) == 1
    assert "blocked" in capsys.readouterr().err
    assert example.main(argv[:2], scorer=demo_scorer()) == 0  # open: computes anyway
