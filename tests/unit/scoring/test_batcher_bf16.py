"""`BatchingScorer` scores equal unbatched scores in bf16.

A left-padded batch changes a bf16 prefill's rounding (the bundled student's entropy moved
by up to 0.42 nats, ``benchmarks/results/batcher-exactness.json``). The batching scorer
splits every batch by token length, so no prefill it runs has padding, and its scores
must agree with one-prompt-at-a-time scoring within 1e-3 (on CPU they are identical).

The model is the tiny random Llama in bf16 under a real :class:`SSDScorer`. Its student,
fitted for two epochs on random data, barely depends on its input (its entropies differ
by about 1e-5 across prompts), so it would hide any difference: the tests also read the
student's input features through a stand-in head, their L1 norm times 1000, on which a
tolerance of 1e-3 means features equal to 1e-6.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.tiny import save_student_artifact

from ssd_guard.errors import GuardInputError
from ssd_guard.scoring.batcher import BatchingScorer, _token_lengths
from ssd_guard.testing import FakeScorer

FEW_SHOT = "Question: What is the capital of France?\nAnswer: Paris\n\n"
QUESTIONS = [
    "What is the capital of Peru?",
    "Who wrote Hamlet?",
    "Which planet is known as the red planet in our solar system?",
    "Hi",
    "In which year did the Berlin Wall fall, ending the division of the city?",
    "What is the chemical symbol for gold?",
    "Who painted the Mona Lisa?",
    "What is the capital of Chile?",
    "Who wrote Macbeth?",
    "Which ocean is the largest ocean on Earth by area and by volume?",
    "Who discovered penicillin in a London laboratory in 1928?",
    "What is the tallest mountain in Africa?",
]
TOL = 1e-3


class _NoEmbedder:
    """Prompt scoring never embeds answers; the scorer only checks the dimension."""

    def get_embedding_dimension(self) -> int:
        return 384


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_lm_path: Path) -> Any:
    from ssd_guard.encoding import PCAProjection
    from ssd_guard.models import load_causal_lm

    lm = load_causal_lm(str(tiny_lm_path), device="cpu", dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, lm.hidden_size, generator=gen)
    pca = PCAProjection.fit(torch.randn(64, 384, generator=gen), 8)
    z = torch.randn(48, 3, 8, generator=gen)
    root = tmp_path_factory.mktemp("bf16-artifact")
    # The last layer: the deepest read, where padding moves the features most.
    path = save_student_artifact(root, lm, layer=4, pca=pca, x=x, z=z, few_shot=FEW_SHOT)
    return lm, path


def _load(artifact: Any) -> Any:
    from ssd_guard.scoring.ssd import SSDScorer

    lm, path = artifact
    return SSDScorer.load(path, lm=lm, embedder=_NoEmbedder(), batch_size=8)


@pytest.fixture(scope="module")
def bf16_scorer(bf16_artifact: Any) -> Any:
    return _load(bf16_artifact)


@pytest.fixture(scope="module")
def feature_scorer(bf16_artifact: Any) -> Any:
    """The same scorer with the stand-in head: ``1000 * |features|_1`` per prompt."""
    scorer = _load(bf16_artifact)
    scorer.entropy_from_hidden = lambda h: 1000.0 * h.float().abs().sum(-1)
    return scorer


class _Recording:
    """Delegates to a scorer and records the prompts of every ``score_prompts`` call."""

    def __init__(self, scorer: Any) -> None:
        self._scorer = scorer
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scorer, name)

    def score_prompts(self, prompts: Any, **kw: Any) -> list[float]:
        with self._lock:
            self.calls.append(list(prompts))
        return list(self._scorer.score_prompts(prompts, **kw))


def _unbatched(scorer: Any) -> dict[str, float]:
    return {q: scorer.score_prompts([q])[0] for q in QUESTIONS}


def test_the_questions_have_shared_and_distinct_token_lengths(bf16_scorer) -> None:
    lengths = _token_lengths(bf16_scorer, QUESTIONS)
    assert lengths is not None
    assert 1 < len(set(lengths)) < len(QUESTIONS)  # buckets of one and of several


def test_padding_is_what_moves_bf16_features(feature_scorer) -> None:
    """The reference point: a left-padded bf16 batch does not reproduce the unbatched
    features on this model, a same-length (unpadded) batch does."""
    ref = _unbatched(feature_scorer)
    with BatchingScorer(feature_scorer, bucket_by_length=False) as unbucketed:
        padded = unbucketed.score_prompts(QUESTIONS)  # one padded batch, as before
    assert padded == feature_scorer.score_prompts(QUESTIONS)
    worst = max(abs(p - ref[q]) for q, p in zip(QUESTIONS, padded, strict=True))
    if worst <= TOL:
        pytest.skip(f"padding moved no score by more than {TOL} on this CPU ({worst:.2e})")
    lengths = _token_lengths(feature_scorer, QUESTIONS)
    assert lengths is not None
    n = max(set(lengths), key=lengths.count)
    same = [q for q, k in zip(QUESTIONS, lengths, strict=True) if k == n]
    assert len(same) > 1
    assert feature_scorer.score_prompts(same) == pytest.approx([ref[q] for q in same], abs=TOL)


def _concurrently(batching: BatchingScorer, requests: list[str]) -> list[tuple[str, float]]:
    start = threading.Barrier(8)

    def worker(chunk: list[str]) -> list[tuple[str, float]]:
        start.wait()
        return [(q, batching.score_prompts([q])[0]) for q in chunk]

    with ThreadPoolExecutor(8) as pool:
        chunks = [requests[i::8] for i in range(8)]
        return [pair for res in pool.map(worker, chunks) for pair in res]


@pytest.mark.parametrize("which", ["student", "features"])
def test_concurrent_single_prompt_calls_equal_unbatched(
    which: str, bf16_scorer, feature_scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = bf16_scorer if which == "student" else feature_scorer
    ref = _unbatched(scorer)
    prefills: list[list[str]] = []
    encode = scorer.encoder.encode

    def recording_encode(texts: Any, **kw: Any) -> torch.Tensor:
        prefills.append(list(texts))
        return encode(texts, **kw)

    monkeypatch.setattr(scorer.encoder, "encode", recording_encode)
    with BatchingScorer(scorer, max_batch=8, max_wait_ms=20.0) as batching:
        assert batching.batches_prefills  # the prefill itself is batched
        got = _concurrently(batching, QUESTIONS * 3)
        stats = batching.batcher.stats
    assert len(got) == len(QUESTIONS) * 3
    worst = max(abs(v - ref[q]) for q, v in got)
    assert worst <= TOL, f"batched scores differ from unbatched by up to {worst:.4g}"
    assert stats.largest_batch > 1  # batches did form
    assert any(len(texts) > 1 for texts in prefills)
    # Every prefill the batcher ran was unpadded: one token length per prefill.
    for texts in prefills:
        lengths = [len(ids) for ids in scorer.encoder.tokenizer(texts)["input_ids"]]
        assert len(set(lengths)) == 1, texts


def test_a_scorer_without_call_statistics_is_batched_by_length(feature_scorer) -> None:
    ref = _unbatched(feature_scorer)
    inner = _Recording(feature_scorer)  # its score_prompts takes no stats=
    with BatchingScorer(inner, max_batch=8, max_wait_ms=20.0) as batching:
        assert not batching.batches_prefills
        got = _concurrently(batching, QUESTIONS * 3)
        assert batching.batcher.stats.largest_batch > 1
    assert max(abs(v - ref[q]) for q, v in got) <= TOL
    for call in inner.calls:
        lengths = _token_lengths(feature_scorer, call)
        assert lengths is not None and len(set(lengths)) == 1, call


def test_a_guarded_call_runs_one_batched_prefill_and_reuses_it(feature_scorer) -> None:
    from ssd_guard.scoring.callstats import CallStats

    q = QUESTIONS[0]
    with BatchingScorer(feature_scorer, max_wait_ms=0.0) as batching:
        stats = CallStats()
        first = batching.score_prompts([q], stats=stats)
        assert stats.forwards == 1 and batching.batcher.stats.requests == 1
        # The call's later checks read the state from its statistics: no second prefill.
        h = batching.hidden([q], stats=stats)
        assert batching.score_prompts([q], stats=stats) == first
        assert stats.forwards == 1 and batching.batcher.stats.requests == 1
        assert torch.equal(h, feature_scorer.hidden([q]))
        # A call whose state is handed over (a GuardedLocalModel's prefill) never queues.
        free = CallStats(hidden_provider=lambda texts: feature_scorer.hidden(texts, formatted=True))
        assert batching.score_prompts([q], stats=free) == first
        assert free.forwards == 0 and batching.batcher.stats.requests == 1


def test_a_multi_prompt_call_equals_unbatched(feature_scorer) -> None:
    ref = _unbatched(feature_scorer)
    with BatchingScorer(feature_scorer) as batching:
        got = batching.score_prompts(QUESTIONS)
        again = batching.score_prompts([QUESTIONS[2], QUESTIONS[0], QUESTIONS[2]])
    assert got == pytest.approx([ref[q] for q in QUESTIONS], abs=TOL)
    assert again == pytest.approx(
        [ref[QUESTIONS[2]], ref[QUESTIONS[0]], ref[QUESTIONS[2]]], abs=TOL
    )


def test_bad_input_gets_the_scorer_error_and_spares_the_batch(bf16_scorer) -> None:
    with BatchingScorer(bf16_scorer, max_wait_ms=0.0) as batching:
        with pytest.raises(GuardInputError):
            batching.score_prompts("What is the capital of Peru?")
        with pytest.raises(GuardInputError):
            batching.score_prompts([None])  # type: ignore[list-item]
        assert batching.batcher.stats.errors == 0
        assert batching.score_prompts([]) == []


def test_a_scorer_without_an_encoder_gets_the_whole_batch() -> None:
    fake = FakeScorer(lambda p: float(len(p)))
    with BatchingScorer(fake) as batching:
        assert batching.score_prompts(["a", "bbb", "cc"]) == [1.0, 3.0, 2.0]
        assert batching.score_prompts(["dddd"]) == [4.0]
    assert _token_lengths(fake, ["a"]) is None


def test_guard_run_through_the_batching_scorer_runs_one_prefill(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm: Any, minilm: Any
) -> None:
    """The prompt check's batched prefill serves the call's answer checks too."""
    from helpers.artifacts import LAYER, _build_artifact
    from helpers.local import PrefillCounter
    from helpers.prefill import _policy

    from ssd_guard.cache import MemoryCache
    from ssd_guard.guard import Guard
    from ssd_guard.scoring.ssd import SSDScorer

    path = _build_artifact(tmp_path_factory.mktemp("batching-guard"), tiny_lm, layer=LAYER)
    scorer = SSDScorer.load(path, lm=tiny_lm, embedder=minilm, batch_size=4)
    policy = _policy("reject_answer", max_regenerations=2)
    answers = iter(["Lima", "Paris", "Rome"])
    with BatchingScorer(scorer, max_wait_ms=0.0) as batching:
        guard = Guard(batching, policy, cache=MemoryCache())
        counter = PrefillCounter(scorer.encoder.model)
        try:
            res = guard.run(QUESTIONS[0], lambda p, temperature=None: next(answers))
        finally:
            counter.close()
        assert batching.batcher.stats.requests == 1  # the prompt's prefill went through it
    assert res.generations == 3
    assert counter.count == 1
    assert res.stats is not None and res.stats.forwards == 1
    direct = Guard(scorer, policy, cache=MemoryCache()).check_prompt(QUESTIONS[0])
    assert res.entropy == pytest.approx(direct.scores["entropy"], abs=1e-6)
