"""The combined risk signal (issue 12): the model's maths and file, token statistics, and
the guard reading ``risk`` and post-generation pair scorers in policies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_guard.errors import ArtifactMismatchError, ConfigError
from ssd_guard.scoring.risk import (
    RISK_INPUTS,
    LinearProbeWeights,
    RiskModel,
    RiskVariant,
)
from ssd_guard.scoring.token_stats import (
    TokenStatsAccumulator,
    step_logprob_entropy,
    teacher_forced_token_stats,
)


def _model(fingerprint: str = "abc", h: int = 4) -> RiskModel:
    rng = np.random.default_rng(0)
    probes = {
        name: LinearProbeWeights(
            start=0,
            stop=h,
            mean=rng.normal(size=h),
            scale=np.abs(rng.normal(size=h)) + 0.5,
            coef=rng.normal(size=h),
            intercept=float(rng.normal()),
        )
        for name in ("pcp", "sep")
    }
    variants = {
        name: RiskVariant(
            inputs=cols,
            mean=rng.normal(size=len(cols)),
            scale=np.abs(rng.normal(size=len(cols))) + 0.5,
            coef=rng.normal(size=len(cols)),
            intercept=float(rng.normal()),
        )
        for name, cols in RISK_INPUTS.items()
    }
    cal = {f"risk:{k}": sorted(rng.uniform(size=20).tolist()) for k in variants}
    return RiskModel(fingerprint, probes, variants, cal, {"note": "unit"})


def test_prediction_is_the_stated_logistic_regression() -> None:
    m = _model()
    feats = torch.randn(5, 4)
    ent = torch.randn(5)
    p, variant = m.predict(feats, ent)
    assert variant == "pre"
    # By hand: standardise [entropy, pcp logit, sep logit], dot, sigmoid.
    cols = [ent.numpy()]
    for name in ("pcp", "sep"):
        w = m.probes[name]
        cols.append(((feats.numpy() - w.mean) / w.scale) @ w.coef + w.intercept)
    x = np.stack(cols, -1)
    v = m.variants["pre"]
    want = 1 / (1 + np.exp(-(((x - v.mean) / v.scale) @ v.coef + v.intercept)))
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-4, atol=1e-6)
    sig = {k: torch.randn(5) for k in ("loglik", "pmi", "consensus")}
    assert m.predict(feats, ent, sig)[1] == "post"
    ts = torch.randn(5, 3)
    p_gen, variant = m.predict(feats, ent, sig, ts)
    assert variant == "post_gen"
    assert torch.all((p_gen > 0) & (p_gen < 1))


def test_file_round_trip_and_refusal_for_another_student(tmp_path: Path) -> None:
    m = _model("student-a")
    m.save(tmp_path)
    back = RiskModel.load(tmp_path, fingerprint="student-a")
    feats, ent = torch.randn(3, 4), torch.randn(3)
    torch.testing.assert_close(back.predict(feats, ent)[0], m.predict(feats, ent)[0])
    assert back.calibration == m.calibration
    assert back.info == {"note": "unit"}
    with pytest.raises(ArtifactMismatchError, match="student-a"):
        RiskModel.load(tmp_path, fingerprint="student-b")
    with pytest.raises(ConfigError, match="fit-risk"):
        RiskModel.load(tmp_path / "nowhere")
    (tmp_path / "risk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a valid risk model"):
        RiskModel.load(tmp_path)


def test_token_statistics_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [1.0, 2.0, 3.0]])
    chosen = torch.tensor([2, 0])
    lp, ent = step_logprob_entropy(logits, chosen)
    p0 = torch.tensor([0.25, 0.25, 0.5])
    assert lp[0].item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert ent[0].item() == pytest.approx(float(-(p0 * p0.log()).sum()), abs=1e-6)
    acc = TokenStatsAccumulator(2, torch.device("cpu"))
    acc.update(logits, chosen, torch.tensor([True, False]))
    acc.update(logits, torch.tensor([0, 0]), torch.tensor([True, False]))
    out = acc.result()
    assert out[0, 0].item() == pytest.approx((math.log(0.5) + math.log(0.25)) / 2, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(math.log(0.25), abs=1e-6)
    assert torch.isnan(out[1]).all()  # a row with no answer token


def test_teacher_forcing_matches_the_decode_loop(tiny_lm) -> None:
    """The guarded generation's accumulated statistics equal the teacher-forced ones."""
    from ssd_guard.generation import decode_loop, left_pad_positions, stop_token_table

    model, tok = tiny_lm.model, tiny_lm.tokenizer
    prompt = "the cat sat on"
    enc = tok([prompt], return_tensors="pt")
    attn = enc["attention_mask"]
    pos = left_pad_positions(attn)
    with torch.inference_mode():
        out = model(
            input_ids=enc["input_ids"], attention_mask=attn, position_ids=pos, use_cache=True
        )
        acc = TokenStatsAccumulator(1, torch.device("cpu"))
        stop = torch.zeros_like(stop_token_table(tok, torch.device("cpu")))  # no stop: 5 tokens
        tokens, lengths = decode_loop(
            model,
            out.past_key_values,
            out.logits[:, -1, :].float(),
            attn,
            pos[:, -1:] + 1,
            temps=torch.ones(1, 1),
            greedy_rows=torch.ones(1, dtype=torch.bool),
            max_new_tokens=5,
            stop_table=stop,
            pad_token_id=int(tok.pad_token_id or 0),
            token_stats=acc,
        )
    ids = tokens[0, : int(lengths[0])].tolist()
    # Teacher forcing on the very token ids (bypassing text round-trips).
    with torch.inference_mode():
        full = torch.cat([enc["input_ids"], torch.tensor([ids])], dim=1)
        logits = model(input_ids=full).logits[0, enc["input_ids"].shape[1] - 1 : -1]
    lp, ent = step_logprob_entropy(logits, torch.tensor(ids))
    got = acc.result()[0]
    assert got[0].item() == pytest.approx(lp.mean().item(), abs=1e-4)
    assert got[1].item() == pytest.approx(lp.min().item(), abs=1e-4)
    assert got[2].item() == pytest.approx(ent.mean().item(), abs=1e-4)
    # The text-level helper agrees on an answer without a leading-space ambiguity.
    text_stats = teacher_forced_token_stats(model, tok, [prompt, prompt], ["cat", ""])
    assert np.isfinite(text_stats[0]).all() and np.isnan(text_stats[1]).all()
