"""Evaluation metrics: the one place the package computes them.

Ranking metrics are thin wrappers over scikit-learn and scipy (``roc_auc_score``,
``roc_curve``, ``average_precision_score``, ``rankdata``, ``spearmanr``) that validate
their inputs and return NaN, rather than warn, where a metric is undefined (a single
class, a constant input). Selective prediction (risk–coverage) and the percentile
bootstrap are small numpy code: ``scipy.stats.bootstrap`` can neither share one set
of resamples across scorers (paired intervals) nor drop the resamples on which a
metric is undefined (a resample without a positive has no AUROC), and both matter here.

Conventions: ``y`` is 1 for the *positive* event (a wrong answer, a mismatched answer),
scores are oriented so that higher means "more likely positive" (riskier). Ties are
resolved by their expectation under random tie-breaking wherever a metric depends on
order, so every function is deterministic and invariant to the input order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _stats
from sklearn import metrics as _sk
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "Interval",
    "auprc",
    "aurc",
    "auroc",
    "bootstrap_ci",
    "bootstrap_indices",
    "mc_accuracy",
    "rankdata",
    "risk_coverage",
    "roc_curve",
    "spearman",
]


def _as_arrays(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return y, s


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata``)."""
    return np.asarray(_stats.rankdata(np.asarray(x, dtype=np.float64).ravel()), dtype=np.float64)


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``; ties count one half).

    NaN when only one class is present.
    """
    y, s = _as_arrays(y, s)
    n1 = int(y.sum())
    if n1 == 0 or n1 == y.shape[0]:
        return float("nan")
    return float(_sk.roc_auc_score(y, s))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)
    (``sklearn.metrics.roc_curve`` without dropping intermediate points). A rate whose
    class is absent stays 0."""
    y, s = _as_arrays(y, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = _sk.roc_curve(y, s, drop_intermediate=False)
    return np.nan_to_num(fpr, nan=0.0), np.nan_to_num(tpr, nan=0.0)


def auprc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the precision–recall curve as average precision
    (``sklearn.metrics.average_precision_score``: ``AP = Σ (Rₙ − Rₙ₋₁) Pₙ`` over
    distinct thresholds). NaN when there is no positive.
    """
    y, s = _as_arrays(y, s)
    if not y.any():
        return float("nan")
    return float(_sk.average_precision_score(y, s))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``); NaN if an input is
    constant or there are fewer than 3 pairs (two points always correlate ±1)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(_stats.spearmanr(a, b).statistic)


def risk_coverage(error: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selective-prediction curve: keep the least risky answers first.

    Returns ``coverage`` (k/n for k = 1..n) and ``selective_risk`` (error rate among the
    k kept answers). Answers with tied scores enter together: within a tie group every
    answer carries the group's mean error (the expectation under random tie-breaking).
    """
    err, s = _as_arrays(error, risk)
    n = err.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(s, kind="mergesort")
    e, ss = err[order].astype(np.float64), s[order]
    group = np.cumsum(np.r_[True, ss[1:] != ss[:-1]]) - 1
    sums = np.bincount(group, weights=e)
    counts = np.bincount(group)
    e = (sums / counts)[group]
    k = np.arange(1, n + 1)
    return k / n, np.cumsum(e) / k


def aurc(error: np.ndarray, risk: np.ndarray) -> float:
    """Area under the risk–coverage curve (mean selective risk over k = 1..n); lower is better."""
    _, r = risk_coverage(error, risk)
    return float(r.mean()) if r.size else float("nan")


def mc_accuracy(scores: np.ndarray, gold: np.ndarray) -> float:
    """Top-1 accuracy of ranking choices by ``scores`` ``[N, C]`` (higher = chosen).

    A tie at the top that includes the gold choice earns ``1 / size of the tie``.
    """
    sc = np.asarray(scores, dtype=np.float64)
    g = np.asarray(gold, dtype=np.intp).ravel()
    if sc.ndim != 2 or sc.shape[0] != g.shape[0]:
        raise ValueError(f"scores must be [N, C] with N = len(gold); got {sc.shape}, {g.shape}")
    if sc.shape[0] == 0:
        return float("nan")
    top = sc == sc.max(axis=1, keepdims=True)
    credit = top[np.arange(g.shape[0]), g] / top.sum(axis=1)
    return float(credit.mean())


# --------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    n_boot: int
    level: float = 0.95

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` resampling indices; share them to get paired intervals."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> Interval:
    """Percentile bootstrap interval of ``metric(*arrays)``, resampling rows jointly.

    Resamples on which the metric is undefined (NaN, e.g. a single class for AUROC)
    are dropped; ``n_boot`` in the result counts the valid ones. Seeded, so the same
    call gives the same interval; pass ``indices`` (from :func:`bootstrap_indices`) to
    pair intervals across scorers.
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap_ci needs at least one array")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError("all arrays must have the same number of rows")
    point = float(metric(*arrs))
    idx = indices if indices is not None else bootstrap_indices(n, n_boot, seed)
    vals = np.array([metric(*(a[i] for a in arrs)) for i in idx], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return Interval(point, float("nan"), float("nan"), 0, level)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    return Interval(point, float(lo), float(hi), int(vals.size), level)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation without fixed points (a random cycle): row ``i`` is paired
    with row ``derangement(n, seed)[i] != i`` (the mismatch checks' "another prompt")."""
    if n < 2:
        raise ValueError("mismatch detection needs at least two prompts")
    order = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, dtype=np.int64)
    other[order] = np.roll(order, -1)
    return other
