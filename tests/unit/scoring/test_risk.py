"""The combined risk signal: the model's maths and file, token statistics, and
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


# --------------------------------------------------------------------------- LOSO selection
Cols = dict[str, np.ndarray]


def _pooled(
    seed: int = 0, n_train: int = 300, n_val: int = 80, sources: tuple[str, ...] = tuple("abcd")
) -> tuple[Cols, np.ndarray, np.ndarray, dict[str, tuple[Cols, np.ndarray]]]:
    """Pooled synthetic sources: ``entropy`` and ``loglik`` are (independently, weakly)
    predictive in every source; ``pcp`` is a probe-like input: strong on the rows it was
    fitted with (every training row, out of fold) and noise on a source it never saw."""
    rng = np.random.default_rng(seed)

    def rows(n: int, in_domain: bool) -> tuple[Cols, np.ndarray]:
        y = rng.uniform(size=n) < 0.4
        cols = {
            "entropy": 1.0 * y + rng.normal(size=n),
            "loglik": -1.0 * y + rng.normal(size=n),
            "pcp": (3.0 * y if in_domain else 0.0) + rng.normal(size=n),
            "sep": rng.normal(size=n),
            "pmi": rng.normal(size=n),
            "consensus": rng.normal(size=n),
        }
        return cols, y

    parts = [rows(n_train, True) for _ in sources]
    cols_tr = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    y_tr = np.concatenate([p[1] for p in parts])
    src_tr = np.repeat(np.array(list(sources)), n_train)
    held = {s: rows(n_val, False) for s in sources}
    return cols_tr, y_tr, src_tr, held


def test_loso_prefers_the_input_that_carries_over() -> None:
    from ssd_guard.training.risk_fit import loso_select, risk_candidates

    cols_tr, y_tr, src_tr, held = _pooled()
    cands = risk_candidates(RISK_INPUTS["pre"])
    assert set(cands) == {"single:entropy", "single:pcp", "single:sep", "full"}  # no dupe
    sel = loso_select(cands, cols_tr, y_tr, src_tr, held)
    assert sel["choice"]["candidate"] == "single:entropy"
    assert sel["choice"]["single_input"] and sel["choice"]["inputs"] == ["entropy"]
    table = sel["candidates"]
    assert set(table["full"]["auroc"]) == set("abcd") == set(sel["sources"])
    assert table["single:entropy"]["worst"] > table["full"]["worst"]
    assert table["single:entropy"]["worst"] > table["single:pcp"]["worst"]
    assert set(table["full"]["by_C"]) == {"0.01", "0.1", "1.0", "10.0"}
    # In domain the probe looks best -- what a validation-only selection would have kept.
    from ssd_guard.training import metrics as M

    assert M.auroc(y_tr, cols_tr["pcp"]) > M.auroc(y_tr, cols_tr["entropy"]) + 0.2

    # With two inputs that both carry over, the set without the probes wins.
    cands = risk_candidates(RISK_INPUTS["post"])
    assert cands["no_probes"] == ("entropy", "loglik", "pmi", "consensus")
    sel = loso_select(cands, cols_tr, y_tr, src_tr, held)
    assert sel["choice"]["candidate"] == "no_probes"
    assert not sel["choice"]["single_input"]


def test_compare_to_singles_report_keys() -> None:
    from ssd_guard.training.risk_fit import _signed, compare_to_singles

    rng = np.random.default_rng(1)
    y = rng.uniform(size=200) < 0.5
    good = y + rng.normal(size=200)
    # Sign-corrected on training rows: a "lower = riskier" input is flipped.
    flipped, sign = _signed(-good, y, -good)
    assert sign == -1.0
    with_nan = good.copy()
    with_nan[:3] = np.nan
    filled, _ = _signed(good, y, with_nan)
    assert np.isfinite(filled).all() and filled[:3].min() > np.nanmax(with_nan)  # riskiest
    row = compare_to_singles(y, good + 0.1 * rng.normal(size=200), {"a": flipped, "b": -good})
    for key in ("n", "error_rate", "combined", "single", "best_single", "best_single_auroc"):
        assert key in row
    assert row["best_single"] == "a" and isinstance(row["combined_ge_best_single"], bool)
    assert compare_to_singles(y, good, {"a": good})["combined_ge_best_single"]  # ties count


def test_a_variant_over_chosen_inputs_round_trips(tmp_path: Path) -> None:
    """A variant may read a subset of its inputs (the LOSO choice); the file stays format
    1, so files with every input (fitted before) load as they did."""
    m = _model("s")
    m.variants["post"] = RiskVariant(
        inputs=("entropy", "loglik"),
        mean=np.zeros(2),
        scale=np.ones(2),
        coef=np.array([1.0, -1.0]),
        intercept=0.0,
    )
    m.save(tmp_path)
    back = RiskModel.load(tmp_path, fingerprint="s")
    assert back.variants["post"].inputs == ("entropy", "loglik")
    assert back.variants["pre"].inputs == RISK_INPUTS["pre"]
    feats, ent = torch.randn(4, 4), torch.randn(4)
    sig = {k: torch.randn(4) for k in ("loglik", "pmi", "consensus")}
    p, variant = back.predict(feats, ent, sig)
    assert variant == "post"
    torch.testing.assert_close(p, torch.sigmoid(ent - sig["loglik"]))
