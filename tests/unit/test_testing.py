"""The public test helpers in ssd_guard.testing: test an agent without loading a model."""

from __future__ import annotations

import pytest

from ssd_guard.cache import ScoreCache
from ssd_guard.errors import CacheUnavailableError
from ssd_guard.guard import CACHE_BLOCK_RULE, Guard
from ssd_guard.policy import Policy, load_default_policy
from ssd_guard.scoring.base import RiskScorer
from ssd_guard.testing import (
    CapturedDecisions,
    FailingCache,
    FakeScorer,
    ScriptedGenerator,
    capture_decisions,
)

POLICY = Policy.from_yaml_text(
    """
version: 1
name: helpers
abstain_message: ABSTAIN
default_action: allow
rules:
  - name: risky
    scope: prompt
    when: {entropy: {gt: 2.5}}
    action: abstain
  - name: unlikely
    scope: answer
    when: {loglik: {lt: -8}}
    action: reject_answer
    max_regenerations: 1
"""
)


# ---------------------------------------------------------------------------- FakeScorer
def test_fake_scorer_is_a_risk_scorer_with_mapping_scores() -> None:
    loglik: dict[str | tuple[str, str], float] = {"yes": -1.0, ("b", "no"): -9.0}
    scorer = FakeScorer({"a": 0.5, "b": 2.0}, loglik)
    assert isinstance(scorer, RiskScorer)
    assert scorer.score_prompts(["a", "b"]) == [0.5, 2.0]
    assert scorer.score_answers(["a"], ["yes"]) == [-1.0]
    assert scorer.score_answers(["b"], [["yes", "no"]]) == [[-1.0, -9.0]]
    assert scorer.prompts_scored == ["a", "b"]
    assert scorer.answers_scored == ["yes", "yes", "no"]
    assert scorer.calls == 3
    scorer.reset()
    assert scorer.calls == 0


def test_fake_scorer_functions_and_defaults() -> None:
    scorer = FakeScorer(lambda p: len(p) / 10, lambda p, a: -float(len(a)))
    assert scorer.score_prompts(["abcde"]) == [0.5]
    assert scorer.score_answers(["q"], ["abc"]) == [-3.0]
    defaults = FakeScorer({"known": 1.0}, default_entropy=0.1, default_loglik=-2.0)
    assert defaults.score_prompts(["known", "other"]) == [1.0, 0.1]
    assert defaults.score_answers(["q"], ["anything"]) == [-2.0]


def test_fake_scorer_refuses_to_invent_a_score() -> None:
    scorer = FakeScorer({"known": 1.0})
    with pytest.raises(LookupError, match="no entropy for prompt 'unknown'"):
        scorer.score_prompts(["unknown"])
    with pytest.raises(LookupError, match="no loglik for answer 'x'"):
        scorer.score_answers(["known"], ["x"])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        scorer.score_answers(["a", "b"], ["x"])


def test_fake_scorer_identity_and_calibration() -> None:
    scorer = FakeScorer(fingerprint="fp1", model_id="org/model", layer=7)
    assert (scorer.fingerprint, scorer.model_id, scorer.layer) == ("fp1", "org/model", 7)
    assert scorer.calibration["entropy"][0] == 0.0 and scorer.calibration["entropy"][-1] == 3.0
    custom = FakeScorer(calibration={"entropy": [3.0, 1.0, 2.0]})
    assert custom.calibration == {"entropy": [1.0, 2.0, 3.0]}


def test_fake_scorer_drives_a_guard_with_the_default_policy() -> None:
    # the module docstring's example
    scorer = FakeScorer({"What is 2+2?": 0.1}, {"4": -0.5})
    guard = Guard(scorer, load_default_policy())
    with capture_decisions() as decisions:
        result = guard.run("What is 2+2?", ScriptedGenerator("4"))
    assert result.output == "4" and not result.abstained
    assert decisions.scopes == ["prompt", "answer"]  # one audited decision each


# ---------------------------------------------------------------------------- FailingCache
def test_failing_cache_closed_blocks_like_a_down_redis() -> None:
    cache = FailingCache()
    assert isinstance(cache, ScoreCache) and not cache.healthy
    with pytest.raises(CacheUnavailableError, match="unreachable"):
        cache.get("k")
    scorer = FakeScorer(default_entropy=0.1, default_loglik=-1.0)
    gen = ScriptedGenerator("answer")
    guard = Guard(scorer, POLICY, cache=cache)
    with capture_decisions() as decisions, pytest.raises(CacheUnavailableError):
        guard.run("q", gen)
    assert gen.calls == 0 and scorer.calls == 0
    assert decisions.rules == [CACHE_BLOCK_RULE] and decisions.actions == ["abstain"]
    assert cache.calls == 2  # the direct get and the guard's lookup


def test_failing_cache_open_degrades_and_the_event_says_so() -> None:
    cache = FailingCache("open", kind="timeout")
    scorer = FakeScorer(default_entropy=0.1, default_loglik=-1.0)
    guard = Guard(scorer, POLICY, cache=cache)
    with capture_decisions() as decisions:
        res = guard.run("q", ScriptedGenerator("answer"))
    assert res.output == "answer" and scorer.calls == 2
    assert [e["cache_error"] for e in decisions] == ["timeout", "timeout"]
    assert all(e["cache_hit"] is False for e in decisions)


async def test_failing_cache_recovers_when_brought_back() -> None:
    cache = FailingCache("open")
    scorer = FakeScorer(default_entropy=0.1)
    guard = Guard(scorer, POLICY, cache=cache)
    await guard.acheck_prompt("q")
    cache.down = False
    assert cache.healthy
    with capture_decisions() as decisions:
        await guard.acheck_prompt("q")  # computed again: the restarted cache is empty
        await guard.acheck_prompt("q")
    assert [e["cache_hit"] for e in decisions] == [False, True]
    assert "cache_error" not in decisions[0]
    assert len(scorer.prompt_calls) == 2
    with pytest.raises(ValueError, match="fail_mode"):
        FailingCache("maybe")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- capture
def test_capture_decisions_views() -> None:
    scorer = FakeScorer({"risky": 2.9}, {"bad": -9.5}, default_entropy=0.1, default_loglik=-1.0)
    guard = Guard(scorer, POLICY)
    with capture_decisions() as decisions:
        assert isinstance(decisions, CapturedDecisions) and len(decisions) == 0
        assert decisions.last is None
        guard.run("risky", ScriptedGenerator("x"))
        assert len(decisions) == 1  # fills as calls are made
        guard.run("fine", ScriptedGenerator("bad", "good"))
    assert decisions.actions == ["abstain", "allow", "reject_answer", "allow"]
    assert decisions.rules == ["risky", None, "unlikely", None]
    assert decisions.scopes == ["prompt", "prompt", "answer", "answer"]
    assert decisions.last is not None and decisions.last["scores"]["loglik"] == -1.0
    assert [e["rule"] for e in decisions.where(scope="answer")] == ["unlikely", None]
    assert decisions[0]["action"] == "abstain" and len(decisions[1:]) == 3
    assert "abstain" in repr(decisions)


# ---------------------------------------------------------------------------- generator
def test_scripted_generator() -> None:
    gen = ScriptedGenerator("first", "second")
    assert [gen("p1"), gen("p2", temperature=1.0), gen("p3")] == ["first", "second", "second"]
    assert gen.prompts == ["p1", "p2", "p3"] and gen.temperatures == [None, 1.0, None]
    assert gen.calls == 3
    with pytest.raises(ValueError):
        ScriptedGenerator()
