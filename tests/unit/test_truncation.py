"""A prompt longer than the encoder's limit is never scored silently.

The encoder keeps the last ``max_tokens`` tokens and counts the cut; the guard puts
``truncated: true`` on the audit events of that call (and ``GuardResult.truncated``), on
the truncated-prefill path and on the zero-extra-pass local model alike. Tiny random LM
with ``max_tokens = 48``.
"""

from __future__ import annotations

import pytest
from helpers.artifacts import LAYER, QUESTIONS, _build_artifact
from structlog.testing import capture_logs

from ssd_guard.cache import MemoryCache
from ssd_guard.guard import Guard
from ssd_guard.local import GuardedLocalModel
from ssd_guard.policy import Policy

MAX_TOKENS = 48
LONG = "Tell me everything about " + "the history of the red planet and " * 20 + "Mars?"

POLICY = Policy.from_yaml_text(
    """
version: 1
name: truncation
default_action: allow
rules:
  - {name: watch-prompt, scope: prompt, when: {entropy: {gt: -1000000000}}, action: log_only}
  - {name: watch-answer, scope: answer, when: {loglik: {lt: 1000000000}}, action: log_only}
"""
)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory, tiny_lm, minilm):
    from ssd_guard.scoring.ssd import SSDScorer

    path = _build_artifact(tmp_path_factory.mktemp("trunc-artifact"), tiny_lm, layer=LAYER)
    # Its own encoder (the limit is set on this scorer only).
    s = SSDScorer.load(path, lm=tiny_lm, embedder=minilm, batch_size=4)
    s.encoder.max_tokens = MAX_TOKENS
    return s


def _events(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e.get("event") == "guard.decision"]


def test_the_long_prompt_really_is_longer_than_the_limit(scorer) -> None:
    n = len(scorer.encoder.tokenizer(scorer.format_prompt(LONG))["input_ids"])
    assert n > 3 * MAX_TOKENS
    n_short = len(scorer.encoder.tokenizer(scorer.format_prompt(QUESTIONS[1]))["input_ids"])
    assert n_short <= MAX_TOKENS


def test_guard_run_marks_every_event_of_a_truncated_call(scorer) -> None:
    guard = Guard(scorer, POLICY, cache=MemoryCache())
    before = scorer.encoder.truncated
    with capture_logs() as logs:
        res = guard.run(LONG, lambda p: "Mars")
    events = _events(logs)
    assert [e["scope"] for e in events] == ["prompt", "answer"]
    assert all(e["truncated"] is True for e in events)
    assert res.truncated and scorer.encoder.truncated == before + 1
    # A prompt within the limit carries no flag.
    with capture_logs() as logs:
        short = guard.run(QUESTIONS[1], lambda p: "Shakespeare")
    assert not short.truncated
    assert all("truncated" not in e for e in _events(logs))


def test_truncated_scores_equal_the_scores_of_the_kept_tokens(scorer) -> None:
    # Cutting keeps the last max_tokens tokens: the score is that of the kept text.
    enc = scorer.encoder
    ids = enc.tokenizer(scorer.format_prompt(LONG))["input_ids"][-MAX_TOKENS:]
    kept = enc.tokenizer.decode(ids)
    assert enc.tokenizer(kept)["input_ids"] == ids  # the tiny BPE round-trips
    want = scorer.score_prompts([kept], formatted=True)[0]
    assert scorer.score_prompts([LONG])[0] == pytest.approx(want, abs=1e-4)


def test_check_prompt_alone_marks_the_event(scorer) -> None:
    guard = Guard(scorer, POLICY, cache=MemoryCache())
    with capture_logs() as logs:
        guard.check_prompt(LONG + " (again)")
    (event,) = _events(logs)
    assert event["truncated"] is True


def test_local_model_marks_a_truncated_call(scorer) -> None:
    local = GuardedLocalModel(Guard(scorer, POLICY, cache=MemoryCache()), max_new_tokens=2)
    with capture_logs() as logs:
        res = local.invoke(LONG)
    assert res.truncated
    assert [e.get("truncated") for e in _events(logs)] == [True, True]
    # The captured state is the scorer's truncated-prefill state (same kept tokens).
    assert res.entropy == pytest.approx(scorer.score_prompts([LONG])[0], abs=1e-4)


def test_local_model_generates_from_the_whole_prompt_within_the_models_context(scorer) -> None:
    # The scoring limit (48 tokens: what the student reads) must not cut what the model
    # generates from: documents in a long RAG prompt stay in the generation's context.
    local = GuardedLocalModel(Guard(scorer, POLICY, cache=MemoryCache()), max_new_tokens=2)
    text = scorer.format_prompt(LONG)
    n_tokens = len(scorer.encoder.tokenizer(text)["input_ids"])
    assert MAX_TOKENS < n_tokens <= scorer.encoder.context_tokens
    pre, _, cut = local._prefill(text)
    assert not cut and int(pre.attn.shape[1]) == n_tokens
    before = local.stats.long_prompt_scoring_passes
    res = local.invoke(LONG)
    assert res.truncated and local.stats.long_prompt_scoring_passes == before + 1
