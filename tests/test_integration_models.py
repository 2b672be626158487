"""Integration: the real bundled SmolLM2-135M-Instruct, MiniLM and the bundled student."""

import pytest
import torch

from ssd_guard.artifact import load_artifact
from ssd_guard.encoding import PromptEncoder
from ssd_guard.errors import ArtifactMismatchError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from ssd_guard.models import shared_causal_lm

    return shared_causal_lm("smollm2", device="cpu")


def test_real_models_load_offline_and_match_bundled_student(smollm2, minilm) -> None:
    manifest, _ = load_artifact("bundled")
    assert smollm2.model_id == manifest.base_model.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert smollm2.fingerprint == manifest.base_model.fingerprint
    assert smollm2.hidden_size == 576 and smollm2.num_layers == 30
    assert minilm.encode(["x"]).shape == (1, 384)


def test_real_truncated_prefill_matches_full_forward(smollm2) -> None:
    texts = [
        "Question: Who wrote Hamlet?\nAnswer:",
        "Question: What is the largest ocean on Earth?\nAnswer:",
    ]
    fast = PromptEncoder(smollm2.model, smollm2.tokenizer, 17).encode(texts)
    ref = PromptEncoder(smollm2.model, smollm2.tokenizer, 17, truncate=False).encode(texts)
    assert torch.allclose(fast, ref, atol=1e-2, rtol=1e-2)  # bf16


def test_bundled_scorer_scores_real_prompts(smollm2, minilm) -> None:
    from ssd_guard.scoring.ssd import SSDScorer

    scorer = SSDScorer.load("bundled", lm=smollm2, embedder=minilm)
    qs = [
        "What is the capital of Italy?",
        "Which element has the chemical symbol Fe?",
        "In which country is the city of Timbuktu?",
        "Who painted the Mona Lisa?",
    ]
    ent = scorer.score_prompts(qs)
    assert len(ent) == 4 and all(e == e for e in ent)
    # Post-generation check: each prompt's own plausible answer is likelier than an
    # answer of a different kind (a mismatched answer) under that prompt's mixture.
    own = ["Rome", "Iron", "Mali", "Leonardo da Vinci"]
    ll = scorer.score_answers(qs, [[o, "The Battle of Hastings, 1066"] for o in own])
    wins = sum(a > b for a, b in ll)
    assert wins >= 3, ll
    assert scorer.calibration["entropy"] == sorted(scorer.calibration["entropy"])


def test_bundled_student_refuses_another_base_model(tiny_lm, minilm) -> None:
    from ssd_guard.scoring.ssd import SSDScorer

    with pytest.raises(ArtifactMismatchError, match="hidden size: artifact expects 576"):
        SSDScorer.load("bundled", lm=tiny_lm, embedder=minilm)
