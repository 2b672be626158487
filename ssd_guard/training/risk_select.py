"""Choosing the risk regressions: candidates, leave-one-source-out selection, comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssd_guard.scoring.risk import RiskVariant
from ssd_guard.training import metrics as M

_C_GRID = (0.01, 0.1, 1.0, 10.0)
Columns = dict[str, np.ndarray]

#: The inputs read from the student's hidden states: fitted on the pooled sources, so
#: in-domain by construction; the LOSO selection weighs them by how they carry over.
PROBE_INPUTS: tuple[str, ...] = ("pcp", "sep")


def _rows(cols: Mapping[str, np.ndarray], idx: np.ndarray) -> Columns:
    return {k: np.asarray(v)[idx] for k, v in cols.items()}


def _concat(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Columns:
    return {k: np.concatenate([np.asarray(a[k]), np.asarray(b[k])]) for k in a if k in b}


def risk_candidates(inputs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The LOSO candidates of a variant with *inputs*: each single input
    (``single:<name>``), the full set (``full``) and the full set without the hidden-state
    probes (``no_probes``; left out when it repeats another candidate, as in ``pre``)."""
    out: dict[str, tuple[str, ...]] = {f"single:{n}": (n,) for n in inputs}
    out["full"] = tuple(inputs)
    rest = tuple(n for n in inputs if n not in PROBE_INPUTS)
    if rest and rest not in out.values():
        out["no_probes"] = rest
    return out


@dataclass
class _Fit:
    """A fitted regression and the training means standing in for missing inputs."""

    variant: RiskVariant
    fill: np.ndarray

    def predict(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        from scipy.special import expit

        v = self.variant
        x = np.stack([np.asarray(cols[n], dtype=np.float64) for n in v.inputs], axis=-1)
        x = np.where(np.isfinite(x), x, self.fill)
        return np.asarray(expit(((x - v.mean) / v.scale) @ v.coef + v.intercept))


def _fit_lr(
    names: Sequence[str], cols: Mapping[str, np.ndarray], y: np.ndarray, c: float, seed: int
) -> _Fit:
    """Standardise + logistic regression on the named columns (a missing value -- an
    empty answer's token statistics -- is the training rows' mean)."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([np.asarray(cols[n], dtype=np.float64) for n in names], axis=-1)
    finite = np.isfinite(x)
    counts = finite.sum(0)
    fill = np.where(counts > 0, np.where(finite, x, 0.0).sum(0) / np.maximum(counts, 1), 0.0)
    x = np.where(finite, x, fill)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():  # one class only: a constant risk
        rate = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        coef, intercept = np.zeros(len(names)), float(np.log(rate / (1 - rate)))
    else:
        lr = LogisticRegression(C=c, max_iter=5000, random_state=seed)
        lr.fit((x - mean) / scale, y)
        coef, intercept = np.asarray(lr.coef_[0], dtype=np.float64), float(lr.intercept_[0])
    return _Fit(RiskVariant(tuple(names), mean, scale, coef, intercept), fill)


def _summary(aurocs: Mapping[str, float]) -> tuple[float, float]:
    """(worst, mean) AUROC over the sources where it is defined (-inf when none is)."""
    vals = [float(a) for a in aurocs.values() if np.isfinite(a)]
    return (min(vals), float(np.mean(vals))) if vals else (-np.inf, -np.inf)


def _key(row: Mapping[str, Any]) -> tuple[float, float]:
    return (round(float(row["worst"]), 9), round(float(row["mean"]), 9))


def loso_select(
    candidates: Mapping[str, Sequence[str]],
    cols_tr: Mapping[str, np.ndarray],
    y_tr: np.ndarray,
    src_tr: np.ndarray,
    held_out: Mapping[str, tuple[Mapping[str, np.ndarray], np.ndarray]],
    *,
    c_grid: Sequence[float] = _C_GRID,
    seed: int = 0,
) -> dict[str, Any]:
    """Leave-one-source-out choice of a regression's inputs and ``C``.

    For every candidate (name -> input names), ``C`` and held-out source ``s`` of
    *held_out* (``s -> (columns, y)`` of the rows it is scored on), fit on the training
    rows whose source is not ``s`` and take the AUROC on ``s``'s rows. A candidate's ``C``
    and then the candidate are chosen by the best worst-case AUROC over the sources, ties
    by the mean (then: the larger ``C``, the earlier candidate -- single inputs first).
    Returns ``{"sources", "n_rows", "candidates": {name: {"inputs", "C", "auroc":
    {source: AUROC}, "worst", "mean", "by_C"}}, "choice": {...}}``.
    """
    y_tr = np.asarray(y_tr, dtype=bool)
    src_tr = np.asarray(src_tr)
    sources = sorted(held_out)
    table: dict[str, dict[str, Any]] = {}
    best: str | None = None
    for name, inputs in candidates.items():
        by_c: dict[float, dict[str, Any]] = {}
        for c in sorted(c_grid, reverse=True):
            per: dict[str, float] = {}
            for s in sources:
                keep = np.flatnonzero(src_tr != s)
                fit = _fit_lr(inputs, _rows(cols_tr, keep), y_tr[keep], c, seed)
                cols_s, y_s = held_out[s]
                per[s] = M.auroc(np.asarray(y_s, dtype=bool), fit.predict(cols_s))
            worst, mean = _summary(per)
            by_c[c] = {"auroc": per, "worst": worst, "mean": mean}
        c_best = max(by_c, key=lambda c: _key(by_c[c]))  # first of ties: the larger C
        row = {"inputs": list(inputs), "C": c_best, **by_c[c_best]}
        row["by_C"] = {str(c): v for c, v in by_c.items()}
        table[name] = row
        if best is None or _key(row) > _key(table[best]):
            best = name
    if best is None:
        raise ValueError("no LOSO candidate")
    chosen = table[best]
    return {
        "sources": sources,
        "n_rows": {s: len(held_out[s][1]) for s in sources},
        "error_rate": {s: float(np.mean(held_out[s][1])) for s in sources},
        "candidates": table,
        "choice": {
            "candidate": best,
            "inputs": list(chosen["inputs"]),
            "C": chosen["C"],
            "worst_auroc": chosen["worst"],
            "mean_auroc": chosen["mean"],
            "single_input": len(chosen["inputs"]) == 1,
        },
    }


def _signed(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray
) -> tuple[np.ndarray, float]:
    """*x_eval* sign-corrected by the training rows (higher = riskier: the sign of the
    training AUROC - 1/2); a missing value counts as the riskiest (an empty answer)."""
    ok = np.isfinite(x_train)
    a = M.auroc(np.asarray(y_train, dtype=bool)[ok], x_train[ok])
    sign = -1.0 if np.isfinite(a) and a < 0.5 else 1.0
    v = sign * np.asarray(x_eval, dtype=np.float64)
    fin = np.isfinite(v)
    top = float(v[fin].max()) + 1.0 if fin.any() else 0.0
    return np.where(fin, v, top), sign


def compare_to_singles(
    y: np.ndarray, combined: np.ndarray, singles: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """AUROC of the combined risk and of each single input (already sign-corrected) on
    one set of rows, the best single input and ``combined_ge_best_single``."""
    y = np.asarray(y, dtype=bool)
    comb = M.auroc(y, combined)
    single = {n: M.auroc(y, v) for n, v in singles.items()}
    finite = {n: a for n, a in single.items() if np.isfinite(a)}
    best = max(finite, key=lambda n: finite[n]) if finite else None
    best_auc = finite[best] if best is not None else float("nan")
    return {
        "n": len(y),
        "error_rate": float(y.mean()) if len(y) else float("nan"),
        "combined": comb,
        "single": single,
        "best_single": best,
        "best_single_auroc": best_auc,
        "margin": comb - best_auc,
        "combined_ge_best_single": bool(
            np.isfinite(comb) and best is not None and comb >= best_auc - 1e-12
        ),
    }


def _choose_on_validation(
    names: Sequence[str],
    cols_tr: Columns,
    y_tr: np.ndarray,
    cols_va: Columns,
    y_va: np.ndarray,
    seed: int,
) -> float:
    """``C`` by validation AUROC (one source: nothing to hold out)."""
    best: tuple[float, float] | None = None
    for c in _C_GRID:
        a = M.auroc(y_va, _fit_lr(names, cols_tr, y_tr, c, seed).predict(cols_va))
        a = a if np.isfinite(a) else -np.inf
        if best is None or a > best[0]:
            best = (a, c)
    assert best is not None
    return best[1]
