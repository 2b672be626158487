"""Multi-layer / pooled student inputs, thread isolation of the capture hooks, prompt
truncation, answer-text handling, open questions from choice sets, pooled prompt pools."""

from __future__ import annotations

import threading

import pytest
import torch

from ssd_guard.answers import core_span, normalise_answer, question_of
from ssd_guard.encoding import PromptEncoder
from ssd_guard.features import FeatureSpec
from ssd_guard.generation import pool_hidden_states, sample_answers
from ssd_guard.training.distill.data import load_open_from_mc

TEXTS = [
    "Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: Who wrote it?\nAnswer:",
    "Question: What is the capital of France?\nAnswer: Paris\n\nQuestion: Which planet is "
    "known as the red planet in our solar system?\nAnswer:",
]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_multi_layer_and_pooled_match_reference(arch: str, tiny_lm_path, tiny_gemma_path) -> None:
    from ssd_guard.models import load_causal_lm

    lm = load_causal_lm(
        str(tiny_lm_path if arch == "llama" else tiny_gemma_path), device="cpu", dtype="fp32"
    )
    n = lm.num_layers
    spec = FeatureSpec(layers=[1, n], pooled_layers=[0, 2], pool_start=5)
    fast = PromptEncoder(lm.model, lm.tokenizer, features=spec).encode(TEXTS)
    ref = PromptEncoder(lm.model, lm.tokenizer, features=spec, truncate=False).encode(TEXTS)
    assert fast.shape == (2, 4 * lm.hidden_size)
    assert torch.allclose(fast, ref, atol=1e-5)
    # Left padding: each prompt alone gives the same features (pooling ignores padding).
    alone = torch.cat(
        [PromptEncoder(lm.model, lm.tokenizer, features=spec).encode([t]) for t in TEXTS]
    )
    assert torch.allclose(fast, alone, atol=1e-4)
    # The pooled block equals the mean over tokens at position >= pool_start.
    enc = lm.tokenizer([TEXTS[0]], return_tensors="pt")
    out = lm.model(**enc, output_hidden_states=True)
    expect = out.hidden_states[2][0, 5:].mean(0)
    assert torch.allclose(alone[0, 3 * lm.hidden_size :], expect, atol=1e-4)


def test_assemble_matches_encoder_on_teacher_states(tiny_lm) -> None:
    """What distillation stores (last-token and pooled states at every layer) assembles
    into exactly what the run-time encoder computes."""
    spec = FeatureSpec(layers=[2, 3], pooled_layers=[1], pool_start=4)
    res = sample_answers(
        tiny_lm.model, tiny_lm.tokenizer, TEXTS, n_samples=2, max_new_tokens=2, pool_start=4
    )
    assert res.hidden is not None and res.pooled is not None
    stored = spec.assemble(res.hidden, res.pooled)
    live = PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, features=spec).encode(TEXTS)
    assert torch.allclose(stored, live, atol=1e-4)


def test_pool_falls_back_to_last_token() -> None:
    h = [torch.arange(12, dtype=torch.float32).view(1, 3, 4)]
    mask = torch.tensor([[0, 1, 1]])
    got = pool_hidden_states(h, mask, pool_start=10)
    assert torch.equal(got[0, 0], h[0][0, -1])


def test_capture_hooks_are_invisible_to_other_threads(tiny_lm) -> None:
    """A truncating encoder in one thread never raises into, or records from, another
    thread's forward pass through the same model."""
    spec = FeatureSpec(layers=[1, 2])
    enc = PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, features=spec)
    ref = enc.encode(TEXTS)
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []
    stop = threading.Event()

    def full_passes() -> None:
        batch = tiny_lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    tiny_lm.model(**batch)
            except BaseException as exc:  # pragma: no cover - the failure being tested
                errors.append(exc)
                return

    def encodes() -> None:
        for _ in range(30):
            results.append(enc.encode(TEXTS))

    other = threading.Thread(target=full_passes)
    other.start()
    try:
        workers = [threading.Thread(target=encodes) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        other.join()
    assert errors == []
    assert len(results) == 60
    assert all(torch.allclose(r, ref, atol=1e-5) for r in results)


def test_long_prompt_is_truncated_not_silent(tiny_lm, caplog) -> None:
    enc = PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 2, max_tokens=8)
    long = "Question: " + "capital of France " * 30 + "\nAnswer:"
    with caplog.at_level("WARNING"):
        got = enc.encode([long])
    assert enc.truncated == 1
    assert "cut to their last 8 tokens" in caplog.text
    ids = tiny_lm.tokenizer([long], return_tensors="pt")["input_ids"][:, -8:]
    ref = PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 2).encode_ids(ids, torch.ones_like(ids))
    assert torch.allclose(got, ref, atol=1e-5)


def test_encode_refuses_a_bare_string(tiny_lm) -> None:
    with pytest.raises(TypeError, match="list of prompts"):
        PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 1).encode("abc")


def test_feature_spec_validation() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureSpec()
    spec = FeatureSpec(layers=[3, 1], pooled_layers=[5])
    assert spec.deepest == 5 and spec.all_layers == [1, 3, 5]
    assert spec.in_dim(10) == 30
    assert FeatureSpec.single(4).describe() == "last token @ 4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is Paris.", "Paris"),
        ("Answer: William Shakespeare", "William Shakespeare"),
        ("I think it is Au", "Au"),
        ("Paris\nQuestion: next", "Paris"),
        ("  Tokyo  ", "Tokyo"),
        ("It is.", "It is."),  # nothing left after the boilerplate: keep the line
    ],
)
def test_normalise_answer(text: str, expected: str) -> None:
    assert normalise_answer(text) == expected


def test_core_span_drops_the_restated_question() -> None:
    assert core_span("Who painted the Mona Lisa?", "Leonardo da Vinci painted it") == (
        "Leonardo da Vinci"
    )
    assert core_span("What is the capital of France?", "The capital of France is Paris") == (
        "Paris"
    )
    assert core_span("Who wrote Hamlet?", "Shakespeare") is None  # short: no core needed
    assert question_of("few\n\nQuestion: Who wrote Hamlet?\nAnswer:") == "Who wrote Hamlet?"


def test_open_questions_from_choice_sets(tmp_path) -> None:
    p = tmp_path / "mc.jsonl"
    p.write_text(
        '{"query": "Context: Sam lost the keys.\\nQuestion: How does Sam feel?\\nChoices:\\n'
        'A. happy\\nB. upset\\nAnswer:", "choices": ["A", "B"], "gold": 1}\n'
        '{"query": "Q: Is the sky green?\\nA:", "choices": ["Yes", "No"], "gold": 1}\n',
        encoding="utf-8",
    )
    rows = load_open_from_mc(p)
    assert rows[0].prompt == "Question: Sam lost the keys. How does Sam feel?\nAnswer:"
    assert rows[0].answer == "upset" and rows[0].choices == ("happy", "upset")
    assert rows[1].prompt == "Question: Is the sky green?\nAnswer:"
    assert rows[1].aliases == ("No",)
