"""The framework-free Guard: each action changes what the caller gets; audit; cache."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Literal

import pytest
from helpers.fakes import AUDIT_CONTRACT_FIELDS, FailingCache
from helpers.guard import (
    GOOD_DOC,
    POISON_DOC,
    POLICY_YAML,
    Gen,
    Retr,
    decisions_of,
    make_policy,
    make_scorer,
)
from structlog.testing import capture_logs

from ssd_guard.audit import bind_run
from ssd_guard.cache import MemoryCache, RedisCache
from ssd_guard.errors import CacheUnavailableError, ConfigError
from ssd_guard.guard import CACHE_BLOCK_RULE, Guard, format_context
from ssd_guard.policy import load_default_policy


# --------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------
def test_allow_passes_the_answer_through() -> None:
    scorer, gen = make_scorer(), Gen("good answer")
    guard = Guard(scorer, make_policy())
    res = guard.run("easy", gen)
    assert res.output == "good answer" and res.answer == "good answer"
    assert not res.abstained and res.action == "allow"
    assert gen.prompts == ["easy"]
    assert [d.scope for d in res.decisions] == ["prompt", "answer"]


def test_abstain_returns_the_message_without_calling_the_model() -> None:
    scorer, gen = make_scorer(), Gen()
    guard = Guard(scorer, make_policy())
    with capture_logs() as logs:
        res = guard.run("hard", gen)
    assert gen.calls == 0
    assert res.abstained and res.output == "ABSTAIN" and res.answer is None
    assert res.generations == 0
    assert res.decision is not None and res.decision.rule == "risky"
    events = decisions_of(logs)
    assert len(events) == 1 and events[0]["action"] == "abstain"
    assert scorer.answer_calls == []  # nothing generated, nothing to score


def test_retrieve_calls_retriever_puts_documents_in_prompt_and_rescores() -> None:
    scorer, gen = make_scorer(), Gen("good answer")
    retriever = Retr([GOOD_DOC, POISON_DOC])
    guard = Guard(scorer, make_policy(), retriever=retriever)
    with capture_logs() as logs:
        res = guard.run("medium", gen)
    assert retriever.queries == ["medium"]
    augmented = format_context("medium", [GOOD_DOC])
    # The student only ever scores the bare question (what it was trained on): the
    # context prompt goes to the model, never to the scorer.
    assert scorer.prompts_scored == ["medium"]
    assert all(p == ["medium"] for p, _ in scorer.answer_calls)
    assert gen.prompts == [augmented]
    again = decisions_of(logs)[3]
    assert again["scope"] == "prompt" and again["after_retrieval"] is True
    assert again["context_documents"] == 1 and again["scores"] == {"entropy": 2.0}
    assert again["cache_hit"] is None  # the question's entropy was reused, not looked up
    assert GOOD_DOC in res.final_prompt and POISON_DOC not in res.final_prompt
    assert res.documents == [GOOD_DOC] and res.dropped == 1
    assert [(d.scope, d.action) for d in res.decisions] == [
        ("prompt", "retrieve"),
        ("document", "allow"),
        ("document", "flag_poisoned"),
        ("prompt", "allow"),
        ("answer", "allow"),
    ]
    assert res.output == "good answer"


def test_retrieve_respects_k() -> None:
    scorer = make_scorer()
    retriever = Retr([f"doc {i}" for i in range(10)])
    guard = Guard(scorer, make_policy(), retriever=retriever)
    res = guard.run("medium", Gen())
    assert res.documents == ["doc 0", "doc 1", "doc 2"]  # rule k: 3


RETRIEVE_THEN_ABSTAIN = """
version: 1
name: retrieve-then-abstain
abstain_message: ABSTAIN
default_action: allow
rules:
  - {name: uncertain, scope: prompt, when: {entropy: {gt: 1.5}}, action: retrieve, k: 3}
  - {name: risky-even-with-context, scope: prompt, when: {entropy: {gt: 1.8}}, action: abstain}
"""


def test_retrieve_then_still_risky_abstains() -> None:
    # After retrieval the prompt decision is made again on the question's entropy without
    # the retrieve rules: a later abstain rule can still stop the call.
    scorer, gen = make_scorer(), Gen()
    guard = Guard(scorer, make_policy(RETRIEVE_THEN_ABSTAIN), retriever=Retr([GOOD_DOC]))
    res = guard.run("medium", gen)
    assert res.abstained and gen.calls == 0
    assert [d.action for d in res.decisions] == ["retrieve", "allow", "abstain"]
    assert res.decisions[-1].rule == "risky-even-with-context"
    assert scorer.prompts_scored == ["medium"]


def test_a_context_prompt_never_reaches_the_scorer_so_retrieval_cannot_make_it_riskier() -> None:
    # The long context prompt scored riskier than the question and the
    # guard abstained although the retrieved document held the answer. The student now
    # scores the question only; the document and the answer are scored against the
    # question's answer distribution.
    scorer = make_scorer(entropy_contains={"Context:": 2.9})  # a context prompt looks risky
    gen = Gen("good answer")
    guard = Guard(scorer, make_policy(), retriever=Retr([GOOD_DOC]))
    with capture_logs() as logs:
        res = guard.run("medium", gen)
    assert not res.abstained and res.output == "good answer"
    assert GOOD_DOC in gen.prompts[0]  # the model got the document
    assert [(d.scope, d.action) for d in res.decisions] == [
        ("prompt", "retrieve"),
        ("document", "allow"),
        ("prompt", "allow"),
        ("answer", "allow"),
    ]
    assert scorer.prompts_scored == ["medium"]
    assert [p for p, _ in scorer.answer_calls] == [["medium"], ["medium"]]  # doc, answer
    answer = decisions_of(logs)[-1]
    assert answer["scope"] == "answer" and answer["context_documents"] == 1


def test_retrieve_without_retriever_proceeds() -> None:
    gen = Gen("good answer")
    res = Guard(make_scorer(), make_policy()).run("medium", gen)
    assert gen.prompts == ["medium"] and res.output == "good answer"


def test_reject_regenerates_max_times_then_abstains() -> None:
    gen = Gen("bad answer", "bad answer 2", "bad answer 3")
    scorer = make_scorer(loglik_contains={"bad answer": -9.5})
    res = Guard(scorer, make_policy()).run("easy", gen)
    assert gen.calls == 3  # first answer + max_regenerations: 2
    assert res.abstained and res.output == "ABSTAIN"
    assert res.rejected == ["bad answer", "bad answer 2", "bad answer 3"]
    # the last rejection regenerates no more: the rule's outcome (abstain) is recorded
    assert [d.action for d in res.decisions] == ["allow"] + ["reject_answer"] * 2 + ["abstain"]
    assert res.decisions[-1].rule == "unlikely"
    assert res.regeneration == "exhausted"


def test_reject_stops_when_an_unknown_generator_repeats_itself() -> None:
    gen = Gen("bad answer")  # greedy: the same answer every time
    with capture_logs() as logs:
        res = Guard(make_scorer(), make_policy()).run("easy", gen)
    assert gen.calls == 2 and res.abstained and res.regeneration == "stopped-identical"
    rejects = [e for e in decisions_of(logs) if e["rule"] == "unlikely"]
    assert [e["regeneration"] for e in rejects] == ["same-settings", "stopped-identical"]
    assert [e["action"] for e in rejects] == ["reject_answer", "abstain"]


def test_reject_then_accept_a_better_answer() -> None:
    gen = Gen("bad answer", "good answer")
    res = Guard(make_scorer(), make_policy()).run("easy", gen)
    assert gen.calls == 2 and res.output == "good answer" and not res.abstained
    assert res.rejected == ["bad answer"] and res.generations == 2


def test_default_policy_regenerates_once() -> None:
    scorer = make_scorer()  # calibration loglik in [-10, 0]: 5 % quantile = -9.5
    gen = Gen("really bad")
    scorer.loglik["really bad"] = -9.9
    res = Guard(scorer, load_default_policy()).run("easy", gen)
    assert gen.calls == 2 and res.abstained


def test_flag_drops_poisoned_documents() -> None:
    guard = Guard(make_scorer(), make_policy())
    kept, flagged, decisions = guard.check_documents("easy", [GOOD_DOC, POISON_DOC])
    assert kept == [GOOD_DOC] and flagged == [POISON_DOC]
    assert [d.action for d in decisions] == ["allow", "flag_poisoned"]
    gen = Gen()
    res = guard.run("easy", gen, documents=[GOOD_DOC, POISON_DOC])
    assert POISON_DOC not in gen.prompts[0] and GOOD_DOC in gen.prompts[0]
    assert res.dropped == 1 and res.quarantined == []


def test_flag_quarantine_keeps_the_document_aside() -> None:
    policy = make_policy(POLICY_YAML.replace("mode: drop", "mode: quarantine"))
    gen = Gen()
    res = Guard(make_scorer(), policy).run("easy", gen, documents=[GOOD_DOC, POISON_DOC])
    assert res.quarantined == [POISON_DOC] and res.dropped == 0
    assert POISON_DOC not in gen.prompts[0]
    assert res.documents == [GOOD_DOC]


def test_document_rules_filter_on_source() -> None:
    policy = make_policy(
        POLICY_YAML.replace("    mode: drop", "    mode: drop\n    sources: [tool]")
    )
    guard = Guard(make_scorer(), policy)
    assert guard.check_documents("easy", [POISON_DOC], source="retrieval")[1] == []
    assert guard.check_documents("easy", [POISON_DOC], source="tool")[1] == [POISON_DOC]


def test_log_only_passes_through_and_logs() -> None:
    policy = make_policy(POLICY_YAML.replace("action: abstain", "action: log_only"))
    gen = Gen()
    with capture_logs() as logs:
        res = Guard(make_scorer(), policy).run("hard", gen)
    assert gen.calls == 1 and not res.abstained
    assert decisions_of(logs)[0]["action"] == "log_only"


def test_generate_returning_none_is_not_checked() -> None:
    scorer = make_scorer()
    res = Guard(scorer, make_policy()).run(
        "easy", lambda p: {"tool_call": 1}, extract=lambda r: None
    )
    assert res.raw == {"tool_call": 1} and scorer.answer_calls == []


def test_check_answer_uses_entropy_only_when_needed() -> None:
    scorer = make_scorer()
    guard = Guard(scorer, make_policy())
    d = guard.check_answer("easy", "good answer")
    # The fake's one answer table serves every answer signal (loglik, pmi, consensus).
    assert d.scores == {"loglik": -1.0, "pmi": -1.0, "consensus": -1.0}
    assert scorer.prompt_calls == []
    d = guard.check_answer("easy", "good answer", entropy=0.2)
    assert d.scores == {"entropy": 0.2, "loglik": -1.0, "pmi": -1.0, "consensus": -1.0}


def test_policy_path_and_bad_source_label(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY_YAML)
    guard = Guard(make_scorer(), str(path))
    assert guard.policy.name == "test-policy"
    assert guard.has_blocking_rules
    with pytest.raises(ConfigError, match="hidden_state_source"):
        Guard(make_scorer(), make_policy(), hidden_state_source="elsewhere")


# --------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------
def test_every_decision_emits_exactly_one_event_with_all_fields() -> None:
    scorer = make_scorer()
    policy = make_policy()
    guard = Guard(scorer, policy, retriever=Retr([GOOD_DOC, POISON_DOC]))
    with capture_logs() as logs:
        res = guard.run("medium", Gen("bad answer", "good answer"), tags=["t1"], run_name="qa")
    events = decisions_of(logs)
    assert len(events) == len(res.decisions) == 6
    for ev, d in zip(events, res.decisions, strict=True):
        assert ev.keys() >= AUDIT_CONTRACT_FIELDS
        assert ev["action"] == d.action and ev["rule"] == d.rule and ev["scope"] == d.scope
        assert ev["run_id"] == res.run_id
        assert ev["model_id"] == "fake/base-model"
        assert ev["student_fingerprint"] == scorer.fingerprint
        assert ev["hidden_state_source"] == "scorer"
        assert ev["policy_name"] == "test-policy" and ev["policy_sha256"] == policy.sha256
        assert {"scoring", "cache", "total"} <= ev["latency_ms"].keys()
        if ev.get("after_retrieval"):  # the question's entropy reused: nothing looked up
            assert ev["cache_hit"] is None
        else:
            assert isinstance(ev["cache_hit"], bool)
        assert ev["tags"] == ["t1"] and ev["run_name"] == "qa"
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    docs = [e for e in events if e["scope"] == "document"]
    assert [e["source"] for e in docs] == ["retrieval", "retrieval"]
    assert events[2]["thresholds"] == {"loglik.lt": -8.0}


def test_run_ids_come_from_the_bound_run_or_a_new_uuid() -> None:
    guard = Guard(make_scorer(), make_policy())
    with capture_logs() as logs:
        r1 = guard.run("easy", Gen())
        r2 = guard.run("easy", Gen())
        with bind_run("run-42", parent_run_id="agent-7"):
            guard.check_prompt("easy")
            guard.check_answer("easy", "good answer")
    events = decisions_of(logs)
    assert r1.run_id != r2.run_id
    uuid.UUID(r1.run_id)
    assert [e["run_id"] for e in events[:4]] == [r1.run_id] * 2 + [r2.run_id] * 2
    assert [(e["run_id"], e["parent_run_id"], e["step"]) for e in events[4:]] == [
        ("run-42", "agent-7", 1),
        ("run-42", "agent-7", 2),
    ]


def test_hidden_state_source_views_share_counters() -> None:
    guard = Guard(make_scorer(), make_policy())
    view = guard.with_hidden_state_source("proxy:some/model", guarded_model="api-model")
    with capture_logs() as logs, bind_run("r"):
        guard.check_prompt("easy")
        view.check_prompt("easy")
    a, b = decisions_of(logs)
    assert a["hidden_state_source"] == "scorer"
    assert b["hidden_state_source"] == "proxy:some/model" and b["guarded_model"] == "api-model"
    assert (a["step"], b["step"]) == (1, 2)


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------
class SpyCache(MemoryCache):
    def __init__(self) -> None:
        super().__init__()
        self.get_many_calls: list[int] = []

    def get_many(self, keys):  # type: ignore[no-untyped-def]
        self.get_many_calls.append(len(keys))
        return super().get_many(keys)


def test_second_identical_call_is_a_cache_hit() -> None:
    scorer = make_scorer()
    guard = Guard(scorer, make_policy())
    with capture_logs() as logs:
        guard.check_prompt("easy")
        guard.check_prompt("easy")
        guard.check_answer("easy", "good answer")
        guard.check_answer("easy", "good answer")
    assert len(scorer.prompt_calls) == 1 and len(scorer.answer_calls) == 1
    assert [e["cache_hit"] for e in decisions_of(logs)] == [False, True, False, True]


def test_document_lists_use_one_batched_lookup_and_score_only_misses() -> None:
    scorer, cache = make_scorer(), SpyCache()
    guard = Guard(scorer, make_policy(), cache=cache)
    guard.check_documents("easy", ["d1", "d2"])
    scorer.reset()
    with capture_logs() as logs:
        guard.check_documents("easy", ["d1", "d2", "d3", "d4"])
    assert cache.get_many_calls == [2, 4]  # one lookup per list
    assert scorer.answer_calls == [(["easy"], [["d3", "d4"]])]  # one scorer call, misses only
    assert [e["cache_hit"] for e in decisions_of(logs)] == [True, True, False, False]


def test_cache_keys_depend_on_student_identity() -> None:
    cache = MemoryCache()
    s1, s2 = make_scorer(), make_scorer(fingerprint="other-student")
    Guard(s1, make_policy(), cache=cache).check_prompt("easy")
    Guard(s2, make_policy(), cache=cache).check_prompt("easy")
    assert len(s1.prompt_calls) == len(s2.prompt_calls) == 1


def test_closed_cache_failure_blocks_with_typed_error_and_event() -> None:
    scorer, gen = make_scorer(), Gen()
    guard = Guard(scorer, make_policy(), cache=FailingCache("closed"))
    assert guard.has_blocking_rules
    with (
        capture_logs() as logs,
        pytest.raises(CacheUnavailableError, match="fail_mode is 'closed'"),
    ):
        guard.run("easy", gen)
    assert gen.calls == 0 and scorer.n_calls == 0
    (ev,) = decisions_of(logs)
    assert ev["action"] == "abstain" and ev["rule"] == CACHE_BLOCK_RULE
    assert ev.keys() >= AUDIT_CONTRACT_FIELDS and "unreachable" in ev["error"]


def test_open_cache_failure_degrades_to_computing() -> None:
    scorer, gen = make_scorer(), Gen("good answer")
    guard = Guard(scorer, make_policy(), cache=FailingCache("open"))
    with capture_logs() as logs:
        res = guard.run("easy", gen)
    assert res.output == "good answer" and scorer.n_calls == 2
    events = decisions_of(logs)
    assert len(events) == 2 and all(e["cache_hit"] is False for e in events)
    assert all(e["cache_error"] == "unavailable" for e in events)
    assert all("unreachable" in e["cache_error_detail"] for e in events)


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_real_redis_cache_down(fail_mode: Literal["open", "closed"]) -> None:
    cache = RedisCache(
        "redis://127.0.0.1:1/0",
        fail_mode=fail_mode,
        timeout_s=0.05,
        retries=0,
        allow_unsigned=True,
    )  # nothing listens on port 1
    guard = Guard(make_scorer(), make_policy(), cache=cache)
    if fail_mode == "closed":
        with pytest.raises(CacheUnavailableError):
            guard.check_prompt("easy")
    else:
        assert guard.check_prompt("easy").action == "allow"


# --------------------------------------------------------------------------------------
# Async twins
# --------------------------------------------------------------------------------------
async def test_arun_abstain_retrieve_reject() -> None:
    scorer = make_scorer()
    calls: list[str] = []

    async def agen(prompt: str) -> str:
        calls.append(prompt)
        return "bad answer" if len(calls) == 1 else "good answer"

    async def aretriever(question: str) -> list[str]:
        return [GOOD_DOC, POISON_DOC]

    guard = Guard(scorer, make_policy(), aretriever=aretriever)
    res = await guard.arun("hard", agen)
    assert res.abstained and calls == []
    res = await guard.arun("medium", agen)
    assert res.documents == [GOOD_DOC] and res.dropped == 1
    assert calls == [format_context("medium", [GOOD_DOC])] * 2
    assert res.output == "good answer" and res.rejected == ["bad answer"]


async def test_async_checks_match_sync_ones() -> None:
    guard = Guard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC]))
    assert (await guard.acheck_prompt("hard")).action == "abstain"
    assert (await guard.acheck_answer("easy", "bad answer")).action == "reject_answer"
    kept, flagged, _ = await guard.acheck_documents("easy", [GOOD_DOC, POISON_DOC])
    assert (kept, flagged) == ([GOOD_DOC], [POISON_DOC])
    res = await guard.arun("medium", Gen("good answer"))  # sync generate + sync retriever
    assert res.documents == [GOOD_DOC] and res.output == "good answer"


async def test_async_closed_cache_blocks() -> None:
    guard = Guard(make_scorer(), make_policy(), cache=FailingCache("closed"))
    with capture_logs() as logs, pytest.raises(CacheUnavailableError):
        await guard.acheck_prompt("easy")
    assert len(decisions_of(logs)) == 1


def test_prepare_and_complete_halves() -> None:
    guard = Guard(make_scorer(), make_policy(), retriever=Retr([GOOD_DOC]))
    res = guard.prepare("medium")
    assert not res.abstained and GOOD_DOC in res.final_prompt and res.generations == 0
    gen: Callable[[str], str] = Gen("good answer")
    res = guard.complete(res, gen)
    assert res.output == "good answer" and res.generations == 1
