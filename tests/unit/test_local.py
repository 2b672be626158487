"""GuardedLocalModel: the guard scores from the generation's own prefill (zero extra pass).

Correctness only (never timings): the captured state gives the truncated-prefill scores,
the guarded answer is the unguarded one, exactly one prefill runs per allowed call, and
the actions (abstain, reject + regenerate) still act. Tiny random LM + MiniLM.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from helpers.artifacts import QUESTIONS, _build_artifact
from helpers.local import PrefillCounter
from structlog.testing import capture_logs

from ssd_guard.cache import MemoryCache
from ssd_guard.guard import Guard
from ssd_guard.local import GuardedLocalModel
from ssd_guard.policy import Policy


def _policy(rules: str, default: str = "allow") -> Policy:
    return Policy.from_yaml_text(
        f"""
version: 1
name: local-test
abstain_message: ABSTAIN
default_action: {default}
rules:
{rules}
"""
    )


LOG_ONLY = _policy(
    """
  - name: watch-prompt
    scope: prompt
    when: {entropy: {gt: -1000}}
    action: log_only
  - name: watch-answer
    scope: answer
    when: {loglik: {lt: 1000}}
    action: log_only
"""
)


@pytest.fixture(scope="module", params=[3, 4], ids=["mid-layer", "last-layer"])
def scorer(request: pytest.FixtureRequest, tmp_path_factory, tiny_lm, minilm):
    from ssd_guard.scoring.ssd import SSDScorer

    path = _build_artifact(tmp_path_factory.mktemp("local-artifact"), tiny_lm, layer=request.param)
    return SSDScorer.load(path, lm=tiny_lm, embedder=minilm, batch_size=4)


def _hf_greedy(scorer: Any, local: GuardedLocalModel, question: str, n: int) -> list[int]:
    enc = scorer.encoder
    batch = enc.tokenize([scorer.format_prompt(question)])
    with torch.inference_mode():
        out = enc.model.generate(
            **batch, max_new_tokens=n, do_sample=False, pad_token_id=enc.tokenizer.pad_token_id
        )
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    stops = local._stops()
    for i, tok in enumerate(new):
        if bool(stops[tok]):
            return new[:i]
    return new


def test_unguarded_generation_equals_hf_generate(scorer) -> None:
    guard = Guard(scorer, LOG_ONLY, cache=MemoryCache())
    local = GuardedLocalModel(guard, max_new_tokens=6)
    for q in QUESTIONS[:3]:
        ids = _hf_greedy(scorer, local, q, 6)
        want = local.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip()
        assert local.generate(q) == want


def test_guarded_call_runs_one_prefill_and_reference_scores(scorer) -> None:
    guard = Guard(scorer, LOG_ONLY, cache=MemoryCache())
    local = GuardedLocalModel(guard, max_new_tokens=6)
    reference = GuardedLocalModel(guard, max_new_tokens=6)  # unguarded generations
    for q in QUESTIONS[:4]:
        counter = PrefillCounter(scorer.encoder.model)
        try:
            with capture_logs() as logs:
                res = local.invoke(q)
        finally:
            counter.close()
        # One forward pass over the prompt in all: the generation's own prefill.
        assert counter.count == 1
        assert not res.abstained
        assert res.answer == reference.generate(q)
        # The scores equal the reference (truncated prefill) path.
        assert res.entropy == pytest.approx(scorer.score_prompts([q])[0], abs=1e-4)
        answer_events = [e for e in logs if e.get("scope") == "answer"]
        assert len(answer_events) == 1
        want_ll = scorer.score_answers([q], [res.answer or ""])[0]
        assert answer_events[0]["scores"]["loglik"] == pytest.approx(want_ll, abs=1e-3)
        assert {e["hidden_state_source"] for e in logs if "scope" in e} == {"guarded-model"}
    assert local.stats.prefills == 4
    assert local.stats.decoded_from_scoring_prefill == 4
    # Every answer check reused the captured state through the call's CallStats: the
    # provider was asked once per call (by the prompt check) and never again.
    assert local.stats.hidden_reuses == 0


def test_abstain_never_decodes(scorer) -> None:
    policy = _policy(
        """
  - name: all-risky
    scope: prompt
    when: {entropy: {gt: -1000}}
    action: abstain
"""
    )
    local = GuardedLocalModel(Guard(scorer, policy, cache=MemoryCache()))
    res = local.invoke(QUESTIONS[0])
    assert res.abstained and res.output == "ABSTAIN"
    assert res.generations == 0
    assert local.stats.generations == 0 and local.stats.prefills == 1


def test_reject_regenerates_by_sampling_then_abstains(scorer) -> None:
    policy = _policy(
        """
  - name: never-good-enough
    scope: answer
    when: {loglik: {lt: 1000}}
    action: reject_answer
    max_regenerations: 2
"""
    )
    guard = Guard(scorer, policy, cache=MemoryCache())
    local = GuardedLocalModel(guard, seed=0)
    res = local.invoke(QUESTIONS[1])
    assert res.abstained and res.generations == 3 and len(res.rejected) == 3
    # The first try is greedy (= the unguarded generation).
    assert res.rejected[0] == GuardedLocalModel(guard).generate(QUESTIONS[1])
    assert local.stats.decoded_from_scoring_prefill == 1
    # Regenerations need a fresh prefill (the first decode consumed the KV cache).
    assert local.stats.prefills == 3


def test_cached_entropy_still_scores_the_answer_without_extra_pass(scorer) -> None:
    cache = MemoryCache()
    local = GuardedLocalModel(Guard(scorer, LOG_ONLY, cache=cache), max_new_tokens=4)
    first = local.invoke(QUESTIONS[2])
    counter = PrefillCounter(scorer.encoder.model)
    try:
        second = local.invoke(QUESTIONS[2])
    finally:
        counter.close()
    assert counter.count == 1  # the generation's prefill; the scores came from the cache
    assert second.entropy == pytest.approx(first.entropy)
    assert second.answer == first.answer


def test_concurrent_calls_keep_their_own_states(scorer) -> None:
    local = GuardedLocalModel(Guard(scorer, LOG_ONLY, cache=MemoryCache()), max_new_tokens=4)
    want = scorer.score_prompts(QUESTIONS)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: local.invoke(q).entropy, QUESTIONS))
    assert got == pytest.approx(want, abs=1e-4)


def test_needs_a_scorer_with_a_local_model() -> None:
    from helpers.fakes import FakeScorer

    with pytest.raises(TypeError, match="SSDScorer-like"):
        GuardedLocalModel(Guard(FakeScorer(), LOG_ONLY, cache=MemoryCache()))


def test_batching_scorer_coalesces_concurrent_guard_calls(scorer) -> None:
    from ssd_guard.scoring.batcher import BatchingScorer

    want = scorer.score_prompts(QUESTIONS)
    with BatchingScorer(scorer, max_batch=8, max_wait_ms=100.0) as batching:
        assert batching.fingerprint == scorer.fingerprint and batching.layer == scorer.layer
        guard = Guard(batching, LOG_ONLY, cache=MemoryCache())
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            got = list(pool.map(lambda q: guard.check_prompt(q).scores["entropy"], QUESTIONS))
        assert got == pytest.approx(want, abs=1e-4)
        stats = batching.batcher.stats
        assert stats.requests == len(QUESTIONS)
        assert stats.batches < stats.requests  # some calls shared a forward pass
        # Under a GuardedLocalModel the captured state is used, not the batcher.
        local = GuardedLocalModel(guard, max_new_tokens=4)
        res = local.invoke(QUESTIONS[0])
        assert res.entropy == pytest.approx(want[0], abs=1e-4)
        assert batching.batcher.stats.requests == len(QUESTIONS)
    # Closed: later calls run unbatched, same scores.
    assert batching.score_prompts([QUESTIONS[1]]) == pytest.approx([want[1]], abs=1e-4)


def test_langchain_runnable_over_the_local_model(scorer) -> None:
    import asyncio

    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_core.prompts import ChatPromptTemplate

    from ssd_guard.integrations.langchain import LocalGuardedChatModel

    local = GuardedLocalModel(Guard(scorer, LOG_ONLY, cache=MemoryCache()), max_new_tokens=4)
    chat = LocalGuardedChatModel(local, tags=["demo"])
    reference = GuardedLocalModel(Guard(scorer, LOG_ONLY, cache=MemoryCache()), max_new_tokens=4)
    msg = chat.invoke([SystemMessage("be brief"), HumanMessage(QUESTIONS[0])])
    assert isinstance(msg, AIMessage)
    meta = msg.response_metadata["ssd_guard"]
    assert meta["abstained"] is False and msg.content == reference.generate(QUESTIONS[0])
    assert meta["scores"]["entropy"] == pytest.approx(
        scorer.score_prompts([QUESTIONS[0]])[0], abs=1e-4
    )
    chain = ChatPromptTemplate.from_template("{q}") | chat
    assert chain.invoke({"q": QUESTIONS[1]}).content == reference.generate(QUESTIONS[1])
    many = chat.batch(QUESTIONS[:2])
    assert [m.response_metadata["ssd_guard"]["scores"]["entropy"] for m in many] == pytest.approx(
        scorer.score_prompts(QUESTIONS[:2]), abs=1e-4
    )
    amsg = asyncio.run(chat.ainvoke(QUESTIONS[2]))
    assert amsg.response_metadata["ssd_guard"]["scores"]["entropy"] == pytest.approx(
        scorer.score_prompts([QUESTIONS[2]])[0], abs=1e-4
    )
    abstain = _policy(
        """
  - {name: all, scope: prompt, when: {entropy: {gt: -1000}}, action: abstain}
"""
    )
    blocked = LocalGuardedChatModel(GuardedLocalModel(Guard(scorer, abstain, cache=MemoryCache())))
    out = blocked.invoke(QUESTIONS[0])
    assert out.content == "ABSTAIN" and out.response_metadata["ssd_guard"]["abstained"]


def test_as_chat_model_is_deprecated_but_still_works(scorer) -> None:
    from ssd_guard.integrations.langchain import LocalGuardedChatModel

    local = GuardedLocalModel(Guard(scorer, LOG_ONLY, cache=MemoryCache()), max_new_tokens=2)
    with pytest.warns(DeprecationWarning, match="LocalGuardedChatModel"):
        chat = local.as_chat_model(tags=["x"])
    assert isinstance(chat, LocalGuardedChatModel) and chat.local is local
