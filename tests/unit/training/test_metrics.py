"""Evaluation metrics: hand-computed cases and agreement with scikit-learn / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import rankdata as scipy_rankdata
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from ssd_guard.training import metrics as M


def _random_case(seed: int, n: int = 200, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 0.8 * y
    if ties:
        s = np.round(s, 1)
    return y, s


# --------------------------------------------------------------------------- AUROC
def test_auroc_perfect_reversed_and_constant() -> None:
    y = np.array([0, 0, 1, 1])
    assert M.auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert M.auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_hand_computed_with_a_tie() -> None:
    # Positives 0.6, 0.4; negatives 0.5, 0.4. Pairs: (0.6>0.5)=1, (0.6>0.4)=1,
    # (0.4<0.5)=0, (0.4=0.4)=0.5 -> 2.5 / 4.
    assert M.auroc([1, 0, 1, 0], [0.6, 0.5, 0.4, 0.4]) == pytest.approx(0.625)


def test_auroc_single_class_is_nan() -> None:
    assert math.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auroc([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_auprc_match_sklearn(seed: int, ties: bool) -> None:
    y, s = _random_case(seed, ties=ties)
    assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_roc_curve_matches_sklearn() -> None:
    y, s = _random_case(3, ties=True)
    fpr, tpr = M.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(y, s))


def test_auprc_perfect_and_hand_computed() -> None:
    assert M.auprc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    # Ranking: 1 (pos), 2 (neg), 3 (pos): AP = 0.5*1 + 0.5*(2/3).
    assert M.auprc([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(0.5 + 1 / 3)
    assert math.isnan(M.auprc([0, 0], [0.1, 0.2]))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="length"):
        M.auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0, 1], [0.1, float("nan")])


# --------------------------------------------------------------------------- ranks
def test_rankdata_and_spearman_match_scipy() -> None:
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(size=100), 1)
    b = a + rng.normal(size=100)
    np.testing.assert_allclose(M.rankdata(a), scipy_rankdata(a))
    assert M.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert M.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_contains_point_and_is_seeded() -> None:
    y, s = _random_case(4, n=300)
    ci = M.bootstrap_ci(M.auroc, y, s, n_boot=300, seed=7)
    assert ci.low <= ci.value <= ci.high
    assert ci.value == pytest.approx(M.auroc(y, s))
    assert ci.high - ci.low < 0.25
    again = M.bootstrap_ci(M.auroc, y, s, n_boot=300, seed=7)
    assert again == ci
    assert M.bootstrap_ci(M.auroc, y, s, n_boot=300, seed=8) != ci
    assert f"{ci}".count("[") == 1


def test_bootstrap_paired_indices_and_undefined_resamples() -> None:
    y = np.array([1] + [0] * 9)
    s = np.linspace(0, 1, 10)
    idx = M.bootstrap_indices(10, 200, seed=0)
    ci = M.bootstrap_ci(M.auroc, y, s, indices=idx)
    # Resamples without the single positive are dropped, not counted as NaN.
    assert 0 < ci.n_boot < 200
    assert np.isfinite(ci.low) and np.isfinite(ci.high)


def test_bootstrap_rejects_ragged_arrays() -> None:
    with pytest.raises(ValueError, match="same number of rows"):
        M.bootstrap_ci(M.auroc, np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------- selective
def test_risk_coverage_hand_computed() -> None:
    err = np.array([0, 1, 0, 1])
    risk = np.array([0.1, 0.4, 0.2, 0.3])  # keep order: 0, 2, 3, 1
    cov, r = M.risk_coverage(err, risk)
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(r, [0.0, 0.0, 1 / 3, 0.5])
    assert M.aurc(err, risk) == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)


def test_risk_coverage_oracle_reversed_and_ties() -> None:
    err = np.array([0, 0, 1, 1])
    oracle = M.aurc(err, err.astype(float))
    reversed_ = M.aurc(err, -err.astype(float))
    constant = M.aurc(err, np.zeros(4))
    assert oracle < constant < reversed_
    # A constant scorer keeps answers at random: risk = error rate at every coverage.
    assert constant == pytest.approx(0.5)
    assert oracle == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)


def test_mc_accuracy() -> None:
    scores = np.array([[0.1, 0.9, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    gold = np.array([1, 2, 0])
    # Right, wrong, and a two-way tie at the top that includes the gold choice (1/2).
    assert M.mc_accuracy(scores, gold) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError):
        M.mc_accuracy(np.zeros(4), np.zeros(4))
