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


def test_real_guarded_local_generation_needs_no_extra_pass(smollm2, minilm) -> None:
    from ssd_guard.cache import MemoryCache
    from ssd_guard.guard import Guard
    from ssd_guard.local import GuardedLocalModel
    from ssd_guard.policy import load_default_policy
    from ssd_guard.scoring.ssd import SSDScorer

    scorer = SSDScorer.load("bundled", lm=smollm2, embedder=minilm)
    local = GuardedLocalModel(
        Guard(scorer, load_default_policy(), cache=MemoryCache()), max_new_tokens=12
    )
    q = "Which planet is known as the Red Planet?"
    res = local.invoke(q)
    assert local.stats.prefills == 1  # the generation's own prefill, nothing else
    assert res.entropy == pytest.approx(scorer.score_prompts([q])[0], abs=0.05)  # bf16
    if not res.abstained:  # the default policy may abstain/retrieve at this entropy
        assert res.answer == local.generate(q)
        assert "mars" in (res.answer or "").lower()


def test_demo_local_mode_runs_the_real_models(smollm2, minilm, tmp_path) -> None:
    import io
    import json

    from ssd_guard.cli_demo import run_demo
    from ssd_guard.scoring.ssd import SSDScorer

    out = io.StringIO()
    log = tmp_path / "audit.jsonl"
    scorer = SSDScorer.load("bundled", lm=smollm2, embedder=minilm)
    rc = run_demo(
        questions=2, audit_log=log, out=out, local=True, scorer=scorer, chat_model=object()
    )
    text = out.getvalue()
    assert rc == 0 and "mode: GuardedLocalModel" in text and "2 questions" in text
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events and {e["hidden_state_source"] for e in events} == {"guarded-model"}
    assert {e["scope"] for e in events} >= {"prompt"}
