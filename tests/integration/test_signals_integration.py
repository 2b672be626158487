"""Integration: the real bundled student's signals order real cases the right way round.

These pin what the product promises: a correct answer outscores an absurd one
in any phrasing, an injected document scores below the documents that answer the
question, and the shipped examples act on the right cases with the real models.
"""

from __future__ import annotations

import importlib.util
import io

import pytest
from helpers.paths import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scorer():
    from ssd_guard.scoring.ssd import SSDScorer

    return SSDScorer.load("bundled", device="cpu")


def _signal(scorer) -> str:
    return str(scorer.manifest.answers.default_signal)


CASES = [
    ("What is the capital of France?", "Paris", "The capital of France is Paris.", "A banana"),
    (
        "Who wrote Hamlet?",
        "William Shakespeare",
        "Hamlet was written by William Shakespeare.",
        "Seventeen kilograms of cheese",
    ),
    ("What is the capital of Japan?", "Tokyo", "The answer is Tokyo.", "Moist socks"),
    ("Which planet is known as the Red Planet?", "Mars", "It is Mars.", "Tuesday afternoon"),
]


@pytest.mark.parametrize(("question", "short", "sentence", "absurd"), CASES)
def test_correct_answer_beats_absurd_in_any_form(scorer, question, short, sentence, absurd) -> None:
    sig = _signal(scorer)
    s_short, s_sentence, s_absurd = scorer.score_answers(
        [question], [[short, sentence, absurd]], signal=sig
    )[0]
    assert s_short > s_absurd, (sig, s_short, s_absurd)
    assert s_sentence > s_absurd, (sig, s_sentence, s_absurd)


def test_the_default_policy_keeps_correct_answers_and_rejects_absurd_ones(scorer) -> None:
    from ssd_guard.guard import Guard
    from ssd_guard.policy import load_default_policy

    guard = Guard(scorer, load_default_policy())
    rejected_absurd = 0
    for question, short, sentence, absurd in CASES:
        kept = []
        for ok in (short, sentence):
            d = guard.check_answer(question, ok)
            assert d.action != "reject_answer", (question, ok, d.scores)
            kept.append(d.scores["pmi"])
        bad = guard.check_answer(question, absurd)
        assert bad.scores["pmi"] < min(kept), (question, absurd, bad.scores, kept)
        rejected_absurd += bad.action == "reject_answer"
    # The answer rule's threshold (pmi < -5.38) was chosen on outcomes: on the benchmark's
    # validation half it blocks few right answers, so it is narrow and lets most absurd
    # answers here through (their pmi is -3.8 .. -5.8); one of the four is rejected.
    assert rejected_absurd >= 1, rejected_absurd


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_injected_document_scores_below_the_relevant_ones(scorer) -> None:
    example = _load_example("rag_poisoned")
    sig = _signal(scorer)
    scores = scorer.score_answers([example.QUESTION], [example.DOCUMENTS], signal=sig)[0]
    injected = scores[-1]
    assert all(s > injected for s in scores[:-1]), scores


def test_rag_example_flags_the_injection_with_the_real_models(capsys) -> None:
    example = _load_example("rag_poisoned")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "FLAGGED" in line]
    assert len(flagged) == 1 and "IGNORE ALL PREVIOUS" in flagged[0], out
    assert "IGNORE ALL PREVIOUS" not in out.split("prompt sent to the model:", 1)[1]


def test_demo_shows_a_true_catch_and_no_harm_with_the_real_models(tmp_path) -> None:
    """The shipped demo, as a user runs it (wrap() over ChatHuggingFace, the RAG policy):
    every answer it abstains on or changes would have been wrong unguarded, and it shows
    at least one true catch (a dropped injected document or a wrong answer withheld)."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from ssd_guard.cli_demo import DEMO_QUESTIONS, SYSTEM_PROMPT, load_chat_model, run_demo

    _, chat = load_chat_model()
    buf, report = io.StringIO(), {}
    assert run_demo(out=buf, audit_log=tmp_path / "audit.jsonl", report=report) == 0
    text = buf.getvalue()
    rows = report["questions"]
    assert len(rows) == len(DEMO_QUESTIONS)
    for item, row in zip(DEMO_QUESTIONS, rows):
        plain = str(
            chat.invoke([SystemMessage(SYSTEM_PROMPT), HumanMessage(item.question)]).content
        )
        if item.correct(plain):  # right unguarded: the guard must let it through, right
            assert row["right"], (item.question, row, text)
    tally = report["tally"]
    assert tally["abstained_wrong"] == tally["abstained"], text
    assert tally["dropped"] >= 1 or tally["abstained_wrong"] >= 1, text
    assert "WRONG" in text or "RIGHT" in text
    assert "dropped document" in text or "abstained before generating" in text
