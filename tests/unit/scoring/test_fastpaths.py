"""The fast paths give the same numbers as the reference paths (correctness, never timings).

* the hidden state captured during ``model.generate`` (``PromptEncoder.capture``) gives the
  entropy / log-likelihood of the truncated-prefill path;
* batched scoring (left padding, several batches) equals scoring one prompt at a time;
* a :class:`~ssd_guard.scoring.batcher.MicroBatcher` over ``score_prompts`` equals direct
  calls, from threads and from asyncio.

The scorer is a real :class:`SSDScorer` over the tiny random LM: a student fitted for two
epochs on random targets, saved with ``save_artifact`` and loaded with ``SSDScorer.load``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from helpers.artifacts import FEW_SHOT, LAYER, QUESTIONS, _build_artifact  # noqa: F401

from ssd_guard.scoring.batcher import MicroBatcher


@pytest.fixture(scope="module", params=[LAYER, 4], ids=["mid-layer", "last-layer"])
def scorer(request: pytest.FixtureRequest, tmp_path_factory, tiny_lm, minilm):
    from ssd_guard.scoring.ssd import SSDScorer

    path = _build_artifact(
        tmp_path_factory.mktemp("fastpath-artifact"), tiny_lm, layer=request.param
    )
    return SSDScorer.load(path, lm=tiny_lm, embedder=minilm, batch_size=4)


def _generate(scorer: Any, texts: list[str], max_new_tokens: int = 4) -> Any:
    enc = scorer.encoder
    batch = enc.tokenize(texts)
    with enc.capture() as cap, torch.inference_mode():
        out = enc.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=enc.tokenizer.pad_token_id,
        )
    assert cap.hidden is not None
    return cap.hidden, out, batch["input_ids"].shape[1]


def test_captured_state_gives_the_truncated_prefill_entropy(scorer) -> None:
    texts = [scorer.format_prompt(q) for q in QUESTIONS]
    # One prompt at a time (the guarded single-call path) ...
    for q, text in zip(QUESTIONS, texts, strict=True):
        h_cap, _, _ = _generate(scorer, [text])
        via_capture = scorer.entropy_from_hidden(h_cap).item()
        assert via_capture == pytest.approx(scorer.score_prompts([q])[0], abs=1e-4)
    # ... and a left-padded batch of prompts of different lengths.
    h_cap, _, _ = _generate(scorer, texts)
    ent_cap = scorer.entropy_from_hidden(h_cap)
    ent_ref = torch.tensor(scorer.score_prompts(QUESTIONS))
    assert torch.allclose(ent_cap.cpu(), ent_ref, atol=1e-4)
    assert torch.allclose(h_cap, scorer.hidden(QUESTIONS), atol=1e-4)


def test_captured_state_gives_the_reference_loglik(scorer) -> None:
    texts = [scorer.format_prompt(q) for q in QUESTIONS[:3]]
    h_cap, out, n_in = _generate(scorer, texts)
    answers = [
        scorer.encoder.tokenizer.decode(row[n_in:], skip_special_tokens=True).strip() or "x"
        for row in out
    ]
    z = scorer.embed_answers(answers)
    ll_cap = scorer.loglik_from_hidden(h_cap, z).cpu()
    ll_ref = torch.tensor(scorer.score_answers(QUESTIONS[:3], answers))
    assert torch.allclose(ll_cap, ll_ref, atol=1e-3)


def test_batched_scores_equal_unbatched(scorer) -> None:
    assert scorer.encoder.batch_size == 4  # six prompts: two padded batches
    batched = scorer.score_prompts(QUESTIONS)
    single = [scorer.score_prompts([q])[0] for q in QUESTIONS]
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    # Order and duplicates are kept.
    again = scorer.score_prompts([QUESTIONS[2], QUESTIONS[0], QUESTIONS[2]])
    assert again == pytest.approx([single[2], single[0], single[2]], abs=1e-4)
    # Multiple-candidate answer scoring: batched equals one by one.
    cands = [["Lima", "Paris"], ["Shakespeare"], ["Mars", "Venus", "x"]]
    ll = scorer.score_answers(QUESTIONS[:3], cands)
    for q, c, row in zip(QUESTIONS[:3], cands, ll, strict=True):
        alone = [scorer.score_answers([q], [a])[0] for a in c]
        assert row == pytest.approx(alone, abs=1e-3)


def test_microbatcher_over_the_scorer_equals_direct(scorer) -> None:
    direct = {q: scorer.score_prompts([q])[0] for q in QUESTIONS}
    requests = QUESTIONS * 3
    calls: list[int] = []

    def fn(prompts: list[str]) -> list[float]:
        calls.append(len(prompts))
        return scorer.score_prompts(prompts)

    with MicroBatcher(fn, max_batch=8, max_wait_ms=20.0) as batcher:
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(batcher.submit, requests))
        assert got == pytest.approx([direct[q] for q in requests], abs=1e-4)

        async def many() -> list[float]:
            return await asyncio.gather(*(batcher.asubmit(q) for q in QUESTIONS))

        assert asyncio.run(many()) == pytest.approx([direct[q] for q in QUESTIONS], abs=1e-4)
    assert sum(calls) == len(requests) + len(QUESTIONS)
    assert len(calls) < len(requests) + len(QUESTIONS)
