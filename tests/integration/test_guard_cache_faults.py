"""The guard side of cache faults, against a real redis-server:

* 4: a forged cache value (NaN, +-Infinity, ``true``, a wrong schema) is a miss: the
  guard scores the prompt itself and decides on the real score (``cache_hit: false``);
  with an HMAC key, an unsigned value is a miss too.
* 5: the key is the exact text the scorer sees: two prompts that differ in whitespace
  get their own score, whatever the order they arrive in.
* 12: in fail-open mode, a cache failure is on the decision event (``cache_error``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from ssd_guard.cache import HMAC_KEY_ENV, MemoryCache, RedisCache, make_key
from ssd_guard.guard import Guard
from ssd_guard.policy import Policy
from ssd_guard.testing import FakeScorer

POLICY = Policy.from_yaml_text(
    """
version: 1
name: cache-faults
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
    max_regenerations: 0
"""
)
RISKY = "Who won the 1937 chess olympiad?"


def make_scorer() -> FakeScorer:
    return FakeScorer({RISKY: 2.9}, {"made up": -9.5}, default_entropy=0.2, default_loglik=-1.0)


def prompt_key(scorer: FakeScorer, prompt: str, answer: str | None = None) -> str:
    return make_key(
        "ssd-guard",
        student_fingerprint=scorer.fingerprint,
        model_id=scorer.model_id,
        layer=scorer.layer,
        prompt=prompt,
        answer=answer,
    )


def decisions(logs: list[Any]) -> list[Any]:
    return [e for e in logs if e["event"] == "guard.decision"]


@pytest.fixture
def redis_cache(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisCache]:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    cache = RedisCache(redis_url, timeout_s=0.5)
    yield cache
    cache.close()


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# ---------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(
    "forged",
    [
        '{"v":1,"value":{"entropy":NaN}}',
        '{"v":1,"value":{"entropy":-Infinity}}',
        '{"v":1,"value":{"entropy":true}}',
        '{"v":1,"value":{"entropy":false}}',
        '{"v":1,"value":{"entropy":"0.1"}}',
        '{"v":1,"value":{"loglik":0.1}}',  # another signal's schema
        '{"v":1,"value":{"entropy":0.1,"x":1}}',  # not the expected schema
        '{"v":1,"value":{}}',
    ],
)
def test_forged_prompt_value_cannot_let_a_risky_prompt_through(
    redis_cache: RedisCache, raw_redis: redis.Redis, forged: str
) -> None:
    scorer = make_scorer()
    raw_redis.set(prompt_key(scorer, RISKY), forged)
    guard = Guard(scorer, POLICY, cache=redis_cache)
    with capture_logs() as logs:
        d = guard.check_prompt(RISKY)
    assert d.action == "abstain" and d.scores["entropy"] == 2.9
    (event,) = decisions(logs)
    assert event["cache_hit"] is False
    assert scorer.prompts_scored == [RISKY]
    rejected = [
        e for e in logs if e["event"] in ("cache.value.invalid", "guard.cache.invalid_value")
    ]
    assert len(rejected) == 1
    # the bad entry was replaced with the real score
    assert json.loads(raw_redis.get(prompt_key(scorer, RISKY)) or b"null")["value"] == {
        "entropy": 2.9
    }


def test_forged_answer_value_is_a_miss(redis_cache: RedisCache, raw_redis: redis.Redis) -> None:
    scorer = make_scorer()
    raw_redis.set(prompt_key(scorer, "q", "made up"), '{"v":1,"value":{"loglik":Infinity}}')
    guard = Guard(scorer, POLICY, cache=redis_cache)
    d = guard.check_answer("q", "made up")
    assert d.action == "reject_answer" and d.scores["loglik"] == -9.5


async def test_forged_value_is_a_miss_async(
    redis_cache: RedisCache, raw_redis: redis.Redis
) -> None:
    scorer = make_scorer()
    raw_redis.set(prompt_key(scorer, RISKY), '{"v":1,"value":{"entropy":NaN}}')
    guard = Guard(scorer, POLICY, cache=redis_cache)
    d = await guard.acheck_prompt(RISKY)
    assert d.action == "abstain" and scorer.prompts_scored == [RISKY]


def test_a_custom_cache_returning_junk_is_a_miss() -> None:
    class JunkCache(MemoryCache):
        def get_many(self, keys: Any) -> list[Any]:
            return [{"entropy": float("nan")}, {"loglik": True}][: len(keys)]

    scorer = make_scorer()
    guard = Guard(scorer, POLICY, cache=JunkCache())
    with capture_logs() as logs:
        assert guard.check_prompt(RISKY).action == "abstain"
    assert [e["event"] for e in logs].count("guard.cache.invalid_value") == 1
    assert decisions(logs)[0]["cache_hit"] is False


def test_nan_scores_are_not_cached() -> None:
    scorer = FakeScorer(default_entropy=float("nan"), default_loglik=-1.0)
    cache = MemoryCache()
    guard = Guard(scorer, POLICY, cache=cache)
    guard.check_prompt("q")
    guard.check_prompt("q")
    assert len(scorer.prompt_calls) == 2 and len(cache) == 0


def test_with_an_hmac_key_an_unsigned_value_is_a_miss(
    redis_url: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(HMAC_KEY_ENV, "shared-secret")
    cache = RedisCache(redis_url, timeout_s=0.5)
    scorer = make_scorer()
    guard = Guard(scorer, POLICY, cache=cache)
    assert guard.check_prompt(RISKY).action == "abstain"  # computed, stored signed
    with capture_logs() as logs:
        assert guard.check_prompt(RISKY).action == "abstain"
    assert decisions(logs)[0]["cache_hit"] is True  # signed values are hits
    # a forger who can write to Redis but does not know the key
    raw_redis.set(prompt_key(scorer, RISKY), '{"v":1,"value":{"entropy":0.1}}')
    with capture_logs() as logs:
        d = guard.check_prompt(RISKY)
    assert d.action == "abstain" and decisions(logs)[0]["cache_hit"] is False
    assert [e["reason"] for e in logs if e["event"] == "cache.value.bad_signature"] == [
        "missing signature"
    ]
    cache.close()


# ---------------------------------------------------------------------------- item 5
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_prompts_differing_in_whitespace_keep_their_own_scores(
    redis_cache: RedisCache, order: tuple[int, int]
) -> None:
    prompts = ["What is  the capital of France?", "What is the capital of France?"]
    scorer = FakeScorer({prompts[0]: 2.9, prompts[1]: 0.2})
    guard = Guard(scorer, POLICY, cache=redis_cache)
    got = {i: guard.check_prompt(prompts[i]) for i in order}
    assert got[0].scores["entropy"] == 2.9 and got[0].action == "abstain"
    assert got[1].scores["entropy"] == 0.2 and got[1].action == "allow"
    assert sorted(scorer.prompts_scored) == sorted(prompts)  # the scorer saw both, exactly


def test_answers_differing_in_whitespace_keep_their_own_scores() -> None:
    scorer = FakeScorer(default_entropy=0.2, loglik={"Paris": -1.0, " Paris\n": -9.0})
    guard = Guard(scorer, POLICY, cache=MemoryCache())
    assert guard.check_answer("q", "Paris").scores["loglik"] == -1.0
    assert guard.check_answer("q", " Paris\n").scores["loglik"] == -9.0


# ---------------------------------------------------------------------------- item 12
def test_fail_open_records_the_cache_failure_on_the_decision_event(
    redis_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    server = redis_factory()
    cache = RedisCache(server.url, fail_mode="open", timeout_s=0.2, retries=0, cooldown_s=0.5)
    scorer = make_scorer()
    guard = Guard(scorer, POLICY, cache=cache)
    with capture_logs() as logs:
        guard.check_prompt("warm up")
    assert "cache_error" not in decisions(logs)[0]

    server.kill()  # Redis stops
    with capture_logs() as logs:
        first = guard.check_prompt("asked while down")
        second = guard.check_answer("asked while down", "an answer")
    assert first.action == "allow" and second.action == "allow"  # fail open: computed
    down = decisions(logs)
    assert [e["cache_error"] for e in down] == ["connection", "circuit-open"]
    assert all(e["cache_hit"] is False for e in down)
    assert any(e["event"] == "guard.cache.degraded" for e in logs)

    server.restart()
    time.sleep(0.6)  # past the cooldown: the next call probes and recovers
    with capture_logs() as logs:
        guard.check_prompt("asked after the restart")
    assert "cache_error" not in decisions(logs)[0]
    cache.close()


async def test_fail_open_records_the_cache_failure_async(
    redis_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    server = redis_factory()
    cache = RedisCache(server.url, fail_mode="open", timeout_s=0.2, retries=0, cooldown_s=5)
    guard = Guard(make_scorer(), POLICY, cache=cache)
    await guard.acheck_prompt("warm up")
    server.kill()
    with capture_logs() as logs:
        res = await guard.arun("asked while down", lambda p: "an answer")
    assert res.output == "an answer"
    assert [e["cache_error"] for e in decisions(logs)] == ["connection", "circuit-open"]
    await cache.aclose()
    cache.close()


def test_fail_open_unreachable_redis_every_event_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(HMAC_KEY_ENV, raising=False)
    cache = RedisCache("redis://127.0.0.1:1/0", fail_mode="open", timeout_s=0.05, retries=0)
    guard = Guard(make_scorer(), POLICY, cache=cache)
    with capture_logs() as logs:
        res = guard.run("q", lambda p: "an answer", documents=["doc one", "doc two"])
    assert res.output == "an answer"
    events = decisions(logs)
    assert len(events) == 4  # two documents, the prompt, the answer
    assert all(e["cache_error"] in ("connection", "circuit-open") for e in events)
    assert events[0]["cache_error"] == "connection"
    cache.close()
