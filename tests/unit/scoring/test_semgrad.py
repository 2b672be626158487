"""SemGrad / HybridGrad and the SPS position search, on tiny random models."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssd_guard.errors import ArtifactMismatchError
from ssd_guard.scoring.base import PairScorer
from ssd_guard.scoring.semgrad import HybridGradScorer, SemGradScorer, default_layers
from ssd_guard.scoring.sps import (
    paraphrases,
    question_of_prompt,
    select_position,
    select_position_from_features,
)

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Question: Who wrote Hamlet?\nAnswer:",
    "Question: Which planet is the largest in the solar system?\nAnswer:",
    "Question: What is the chemical symbol for gold?\nAnswer:",
    "Question: How many legs does a spider have?\nAnswer:",
]
ANSWERS = ["Paris", "William Shakespeare", "Jupiter", "Au", "Eight legs"]


def _load(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def llama64(tiny_lm_path: Path) -> tuple[Any, Any]:
    return _load(tiny_lm_path, torch.float64)


@pytest.fixture(scope="module")
def gemma64(tiny_gemma_path: Path) -> tuple[Any, Any]:
    model, tok = _load(tiny_gemma_path, torch.float64)
    model.config.final_logit_softcapping = 3.0  # exercise the soft-cap chain rule
    return model, tok


def _reference(
    model: Any, tok: Any, prompt: str, answer: str, softcap: float | None = None
) -> dict[str, Any]:
    """Independent fp64 computation for one pair: ids, answer slice, entropy weights."""
    p_ids = tok(prompt)["input_ids"]
    a_ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].double()
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return {
        "ids": ids,
        "p_len": len(p_ids),
        "a_ids": torch.tensor(a_ids),
        "w": ent / len(a_ids),
        "ent": ent,
    }


def _loss_with_perturbation(
    model: Any, ref: dict[str, Any], layer: int, pos: int, delta: torch.Tensor
) -> float:
    """L with the entropy weights frozen, ``delta`` added to ``hidden_states[layer]`` at
    ``pos`` (the output of decoder layer ``layer - 1``) through a forward hook."""

    def hook(_m: Any, _inp: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[0, pos] += delta
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.base_model.layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ref["ids"]).logits[0, ref["p_len"] - 1 : -1].double()
    finally:
        handle.remove()
    lp = torch.log_softmax(logits, -1).gather(-1, ref["a_ids"][:, None]).squeeze(-1)
    return float(-(ref["w"] * lp).sum())


@pytest.mark.parametrize("which", ["llama64", "gemma64"])
def test_semgrad_matches_finite_differences(which: str, request: pytest.FixtureRequest) -> None:
    model, tok = request.getfixturevalue(which)
    sc = SemGradScorer(model, tok, position=-2)
    prompt, answer = PROMPTS[2], ANSWERS[2]
    grads = sc.hidden_gradients([prompt], [answer], formatted=True)[0]  # [K, d]
    # transformers keeps its own output-capturing hooks once hidden states were asked for
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    ref = _reference(model, tok, prompt, answer)
    pos = ref["p_len"] - 2
    gen = torch.Generator().manual_seed(0)
    # The norms compute in fp32 even in an fp64 model: steps well above that noise (Gemma's
    # hidden states are ~sqrt(d) larger: scaled embeddings), unit directions.
    eps = 1e-3 if which == "llama64" else 3e-2
    for k, layer in enumerate(sc.layers):
        for _ in range(2):
            v = torch.randn(grads.shape[1], generator=gen, dtype=torch.float64)
            v = v / v.norm()
            up = _loss_with_perturbation(model, ref, layer, pos, eps * v)
            down = _loss_with_perturbation(model, ref, layer, pos, -eps * v)
            fd = (up - down) / (2 * eps)
            scale = float(np.linalg.norm(grads[k]))
            assert abs(fd - float(grads[k] @ v.numpy())) <= 2e-3 * scale
    score = sc.score_pairs([prompt], [answer], formatted=True)[0]
    assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks  # none left behind
    assert score == pytest.approx(float(np.abs(grads).mean()), rel=1e-10)


@pytest.mark.parametrize("which", ["llama64", "gemma64"])
def test_closed_form_head_gradient_matches_autograd(
    which: str, request: pytest.FixtureRequest
) -> None:
    model, tok = request.getfixturevalue(which)
    sc = HybridGradScorer(model, tok)
    cap = sc.softcap
    got = sc.score_pairs_all(PROMPTS[:3], ANSWERS[:3], formatted=True)
    for i in range(3):
        ref = _reference(model, tok, PROMPTS[i], ANSWERS[i])
        with torch.no_grad():
            x = model.base_model(input_ids=ref["ids"]).last_hidden_state[0]
            x = x[ref["p_len"] - 1 : -1].double()
        w_head = model.get_output_embeddings().weight.detach().double().clone()
        w_head.requires_grad_(True)
        logits = x @ w_head.T
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        lp = torch.log_softmax(logits, -1).gather(-1, ref["a_ids"][:, None]).squeeze(-1)
        (g,) = torch.autograd.grad(-(ref["w"] * lp).sum(), w_head)
        assert got["lm_head_grad"][i] == pytest.approx(float(g.abs().mean()), rel=1e-9)
        ent = float(ref["ent"].mean())
        assert got["tok_entropy_mean"][i] == pytest.approx(ent, rel=1e-9)
        a = math.exp(-ent)
        hybrid = a * got["lm_head_grad"][i] + (1 - a) * got["semgrad"][i]
        assert got["hybridgrad"][i] == pytest.approx(hybrid, rel=1e-12)
        assert got["tok_lp_min"][i] == pytest.approx(float(lp.detach().min()), rel=1e-9)
    assert sc.score_pairs(PROMPTS[:3], ANSWERS[:3], formatted=True) == pytest.approx(
        list(got["hybridgrad"]), rel=1e-12
    )


def test_batched_equals_one_at_a_time_and_reproducible(tiny_lm: Any) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    batched = SemGradScorer(model, tok, position=-3, batch_size=5)
    single = SemGradScorer(model, tok, position=-3, batch_size=1)
    a = batched.score_pairs_all(PROMPTS, ANSWERS, formatted=True)
    b = single.score_pairs_all(PROMPTS, ANSWERS, formatted=True)
    again = batched.score_pairs_all(PROMPTS, ANSWERS, formatted=True)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-9)
        np.testing.assert_array_equal(a[k], again[k])
    assert np.all(np.isfinite(a["semgrad"])) and np.all(a["semgrad"] > 0)
    multi = single.score_pairs_all(PROMPTS, ANSWERS, formatted=True, positions=[-3, -1])
    np.testing.assert_array_equal(multi["semgrad@-3"], b["semgrad"])
    last = SemGradScorer(model, tok, position=-1).score_pairs(PROMPTS, ANSWERS, formatted=True)
    np.testing.assert_allclose(multi["semgrad@-1"], last, rtol=2e-4)


def test_bf16_runs_and_tracks_fp32(tiny_lm_path: Path) -> None:
    m32, tok = _load(tiny_lm_path, torch.float32)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    s32 = SemGradScorer(m32, tok).score_pairs_all(PROMPTS, ANSWERS, formatted=True)
    s16 = SemGradScorer(m16, tok).score_pairs_all(PROMPTS, ANSWERS, formatted=True)
    for k in ("semgrad", "hybridgrad", "tok_entropy_mean"):
        assert np.all(np.isfinite(s16[k]))
        np.testing.assert_allclose(s16[k], s32[k], rtol=0.1)


def test_empty_answer_nan_formatting_and_protocol(tiny_lm: Any) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    sc = HybridGradScorer(
        model, tok, format_prompt=lambda q: f"Question: {q}\nAnswer:", batch_size=2
    )
    assert isinstance(sc, PairScorer)
    assert (sc.name, sc.signal) == ("HybridGrad", "hybridgrad")
    raw = sc.score_pairs(["What is the capital of France?", "Who wrote Hamlet?"], ["Paris", " "])
    fmt = sc.score_pairs([PROMPTS[0], PROMPTS[1]], ["Paris", ""], formatted=True)
    assert raw[0] == pytest.approx(fmt[0], rel=1e-6)
    assert math.isnan(raw[1]) and math.isnan(fmt[1])
    assert sc.layers == default_layers(4) == [2, 3]


def test_config_round_trip_and_fingerprint_mismatch(
    tiny_lm: Any, tiny_gemma_path: Path, tmp_path: Path
) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    sc = SemGradScorer(model, tok, position=-2, layers=[1, 2], model_id="tiny")
    sc.sps = {"best_position": -2}
    sc.calibrate(PROMPTS, ANSWERS, formatted=True)
    assert sc.calibration["semgrad"] == sorted(sc.calibration["semgrad"])
    assert len(sc.calibration["hybridgrad"]) == len(PROMPTS)
    path = sc.save_config(tmp_path / "semgrad.json")
    back = HybridGradScorer.from_config(path, model, tok)
    assert (back.position, back.layers, back.signal) == (-2, [1, 2], "hybridgrad")
    assert back.calibration == sc.calibration and back.sps == {"best_position": -2}
    other, other_tok = _load(tiny_gemma_path)
    with pytest.raises(ArtifactMismatchError, match="fingerprint"):
        SemGradScorer.from_config(path, other, other_tok)


def test_paraphrases_and_question_extraction() -> None:
    q = "Which planet is the largest?"
    ps = paraphrases(q)
    assert ps[0] == q and len(ps) == len(set(ps)) >= 6
    assert "What planet is the largest?" in ps and "Which planet is the largest" in ps
    assert paraphrases(q) == ps
    assert question_of_prompt("Question: Who wrote Hamlet?\nAnswer:") == "Who wrote Hamlet?"


def test_sps_recovers_planted_position() -> None:
    """Position k=3 holds the question's meaning (+ small paraphrase noise); the others
    hold paraphrase-specific noise or template features shared by every question."""
    rng = np.random.default_rng(0)
    n_q, n_p, n_pos, n_layers, d = 12, 5, 6, 5, 16
    meaning = rng.normal(size=(n_q, d))
    template = rng.normal(size=(n_pos, n_layers, d))
    feats = np.empty((n_q * n_p, n_pos, n_layers, d))
    for s in range(n_q * n_p):
        feats[s] = template + rng.normal(size=(n_pos, n_layers, d))
        feats[s, 2, 2:] += 3.0 * meaning[s // n_p]  # k = 3, upper layers
        feats[s, 5, :2] += 3.0 * meaning[s // n_p]  # k = 6, but only in lower layers
    res = select_position_from_features(
        feats,
        [n_p] * n_q,
        positions=list(range(1, n_pos + 1)),
        layers=list(range(n_layers)),
        select_layers=default_layers(n_layers - 1),
        num_layers=n_layers - 1,
    )
    assert res.best_position == -3 and res.best_k == 3
    scores = np.array(res.scores)
    assert scores[2, 3] > 0.5 and abs(scores[0, 3]) < 0.1
    assert np.array(res.retrieval)[2, 3] > 0.9
    assert set(res.best_layers) <= {2, 3}


def test_select_position_runs_on_a_model(tiny_lm: Any) -> None:
    res = select_position(
        tiny_lm.model,
        tiny_lm.tokenizer,
        ["What is the capital of France?", "Who wrote Hamlet?", "How many legs has a spider?"],
        positions=range(1, 4),
    )
    assert res.layers == list(range(5)) and len(res.scores) == 3
    assert res.best_position in (-1, -2, -3) and res.select_layers == [2, 3]
    assert np.all(np.isfinite(np.array(res.scores)))
