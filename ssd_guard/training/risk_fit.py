"""Fit the combined ``risk`` signal of a student on a work directory (``ssd-guard fit-risk``).

See :mod:`ssd_guard.scoring.risk` for what the signal is. Fitting, on the **training split
only** (selection of the probes' layer and regularisation on validation, nothing on test):

1. PCP and SEP probes (logistic regressions) on each of the student's last-token feature
   layers; the layer and ``C`` with the best validation AUROC are kept (SEP's target is
   the embedding semantic entropy of the teacher's samples, binarised at the training
   split's best split).
2. Out-of-fold probe logits for the training rows (5 folds), so the combiner sees probe
   values as noisy as at run time.
3. One logistic regression per variant (``pre``, ``post``, ``post_gen``) whose **input set
   and** ``C`` are chosen by leave-one-source-out (LOSO) when the work
   directory pools two or more sources (the ``source`` field of ``prompts.jsonl``): the
   candidates are each single input, the full input set and the full set without the
   hidden-state probes (:data:`PROBE_INPUTS`); for each held-out source a candidate is
   fitted on the other sources' training rows and scored on the held-out source's
   validation rows (``loso_rows="train+validation"``: its training rows too), the probe
   columns of those rows coming from PCP / SEP probes refitted *without* that source --
   so a probe counts only as much as it carries over to a source it never saw. The
   candidate with the best worst-case AUROC over held-out sources wins (ties: the mean),
   and is refitted on every training row. One source only: the full set, ``C`` on
   validation (as before).
4. ``calibration``: each variant's sorted validation values (for quantile thresholds).

:func:`fit_risk_with_report` also returns the selection tables and the test split's per
source AUROCs of the combined risk against each single input (``--report``), both for the
stored model (every source in its training data) and leave-one-source-out (the source's
test rows scored by a model that never saw the source: the transfer to new questions).

The token statistics of the default answers are computed once per work directory by
teacher forcing and kept in ``<workdir>/token_stats.safetensors`` (resumable).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ssd_guard.scoring.risk import RISK_INPUTS, LinearProbeWeights, RiskModel, RiskVariant
from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES
from ssd_guard.training import metrics as M
from ssd_guard.training.risk_inputs import TOKEN_STATS_FILE as TOKEN_STATS_FILE  # re-export
from ssd_guard.training.risk_inputs import (
    Logger,
    _fit_probe,
    _layer_stats,
    _logit,
    _refit_probe,
    _weights,
    predict_rows,
    risk_inputs,
    workdir_token_stats,
)
from ssd_guard.training.risk_select import (
    PROBE_INPUTS,
    Columns,
    _choose_on_validation,
    _concat,
    _fit_lr,
    _rows,
    _signed,
    compare_to_singles,
    loso_select,
    risk_candidates,
)
from ssd_guard.training.stats_scorers import features_from_stats

__all__ = [
    "PROBE_INPUTS",
    "compare_to_singles",
    "fit_risk",
    "fit_risk_with_report",
    "loso_select",
    "risk_candidates",
    "risk_inputs",
    "workdir_token_stats",
]

#: Where a held-out source is scored in the LOSO selection.
LOSO_ROWS = ("validation", "train+validation")


def fit_risk(data: Any, ssd: Any, **kwargs: Any) -> RiskModel:
    """The risk model alone: :func:`fit_risk_with_report` (same arguments) without its
    report."""
    return fit_risk_with_report(data, ssd, **kwargs)[0]


def fit_risk_with_report(
    data: Any,
    ssd: Any,
    *,
    token_stats: np.ndarray | None,
    seed: int = 0,
    folds: int = 5,
    loso_rows: str = "validation",
    log: Logger | None = None,
) -> tuple[RiskModel, dict[str, Any]]:
    """:func:`fit_risk`, and the report: per variant the LOSO table, the choice, and the
    test split's per-source AUROCs of the combined risk and of each single input, for the
    stored model (``test``) and leave-one-source-out (``test_loso``)."""
    say = log or (lambda m: None)
    if loso_rows not in LOSO_ROWS:
        raise ValueError(f"loso_rows must be one of {LOSO_ROWS}, not {loso_rows!r}")
    spec = ssd.features
    if spec.pooled_layers:
        raise ValueError("the risk probes read last-token features; this student reads pooled")
    layers = list(spec.layers)
    tr_rows, va_rows = data.split["train"], data.split["validation"]
    te_rows = np.asarray(data.split.get("test", []), dtype=np.intp)
    train, val = data.stats.subset(tr_rows), data.stats.subset(va_rows)
    f_tr = features_from_stats(spec, train)
    f_va = features_from_stats(spec, val)
    h = f_tr.shape[1] // len(layers)  # last-token states only: one hidden size per layer
    y_tr = ~np.asarray(data.correct[tr_rows], dtype=bool)
    y_va = ~np.asarray(data.correct[va_rows], dtype=bool)
    src = np.asarray([str(r.get("source", "")) for r in data.prompts])
    src_tr, src_va = src[tr_rows], src[va_rows]
    sources = sorted(set(src_tr.tolist()))
    use_loso = len(sources) >= 2
    ls_tr, ls_va = _layer_stats(train, f_tr, layers, h), _layer_stats(val, f_va, layers, h)
    probes: dict[str, LinearProbeWeights] = {}
    info: dict[str, Any] = {"probes": {}, "variants": {}}
    oof: dict[str, np.ndarray] = {}
    # Per held-out source, the probe logits of its rows from probes fitted without it.
    held_logits: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    test = data.stats.subset(te_rows) if len(te_rows) else None
    f_te = features_from_stats(spec, test) if test is not None else None
    src_te = src[te_rows]
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(tr_rows)) % folds
    for kind in ("pcp", "sep"):
        t0 = time.perf_counter()
        y_t = None if kind == "sep" else ~y_tr
        y_v = None if kind == "sep" else ~y_va
        probe, c, score = _fit_probe(kind, ls_tr, y_t, ls_va, y_v, layers, seed)
        probes[kind] = _weights(probe, layers, h)
        target = probe.entropy.score(ls_tr) if kind == "sep" else ~y_tr
        # Out-of-fold logits for the combiner's training rows (same layer, C, SE split).
        pred = np.zeros(len(tr_rows))
        for f in range(folds):
            sub_tr, sub_te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            w = _refit_probe(kind, probe, c, ls_tr.subset(sub_tr), target[sub_tr], layers, h, seed)
            pred[sub_te] = _logit(w, f_tr[sub_te])
        oof[kind] = pred
        held_logits[kind] = {}
        if use_loso:
            for s in sources:
                keep = np.flatnonzero(src_tr != s)
                w = _refit_probe(kind, probe, c, ls_tr.subset(keep), target[keep], layers, h, seed)
                held_logits[kind][s] = {
                    "train": _logit(w, f_tr[np.flatnonzero(src_tr == s)]),
                    "validation": _logit(w, f_va[np.flatnonzero(src_va == s)]),
                    "test": _logit(w, f_te[np.flatnonzero(src_te == s)])
                    if f_te is not None
                    else np.zeros(0),
                }
        info["probes"][kind] = {
            "layer": int(probe.layer_),
            "C": c,
            "validation_auroc_of_own_target": score,
            "seconds": time.perf_counter() - t0,
        }
        say(f"{kind}: layer {probe.layer_}, C {c}, validation AUROC {score:.3f}")
    ts_tr = None if token_stats is None else token_stats[tr_rows]
    ts_va = None if token_stats is None else token_stats[va_rows]
    ts_te = None if token_stats is None else token_stats[te_rows]
    cols_tr = risk_inputs(ssd, train, probes, ts_tr)
    cols_tr.update(oof)
    cols_va = risk_inputs(ssd, val, probes, ts_va)
    cols_te = risk_inputs(ssd, test, probes, ts_te) if test is not None else None
    y_te = ~np.asarray(data.correct[te_rows], dtype=bool)
    by_split = {"train": (cols_tr, src_tr), "validation": (cols_va, src_va)}
    if cols_te is not None:
        by_split["test"] = (cols_te, src_te)
    ys = {"train": y_tr, "validation": y_va, "test": y_te}

    def held(split: str, s: str) -> tuple[Columns, np.ndarray]:
        """Source *s*'s rows of *split*, probe columns from probes that never saw *s*."""
        cols, srcs = by_split[split]
        rows = np.flatnonzero(srcs == s)
        out = _rows(cols, rows)
        for kind in PROBE_INPUTS:
            out[kind] = held_logits[kind][s][split]
        return out, ys[split][rows]

    def scored(s: str) -> tuple[Columns, np.ndarray]:
        if loso_rows == "validation":
            return held("validation", s)
        (a, ya), (b, yb) = held("train", s), held("validation", s)
        return _concat(a, b), np.concatenate([ya, yb])

    held_out = {s: scored(s) for s in sources} if use_loso else {}
    variants: dict[str, RiskVariant] = {}
    calibration: dict[str, list[float]] = {}
    report: dict[str, Any] = {
        "workdir": str(data.root),
        "sources": sources,
        "selection": "leave-one-source-out" if use_loso else "validation (one source)",
        "loso_rows": loso_rows if use_loso else None,
        "split_sizes": {
            split: {s: int(np.sum(srcs == s)) for s in sources}
            for split, (_, srcs) in by_split.items()
        },
        "variants": {},
    }
    fits: dict[str, tuple[tuple[str, ...], float]] = {}
    for name, inputs in RISK_INPUTS.items():
        if name == "post_gen" and token_stats is None:
            continue
        cands = risk_candidates(inputs)
        sel: dict[str, Any] | None = None
        if use_loso:
            sel = loso_select(cands, cols_tr, y_tr, src_tr, held_out, seed=seed)
            chosen, c = tuple(sel["choice"]["inputs"]), float(sel["choice"]["C"])
            cand = str(sel["choice"]["candidate"])
        else:
            chosen, cand = tuple(inputs), "full"
            c = _choose_on_validation(chosen, cols_tr, y_tr, cols_va, y_va, seed)
        fit = _fit_lr(chosen, cols_tr, y_tr, c, seed)
        variants[name] = fit.variant
        fits[name] = (chosen, c)
        vinfo: dict[str, Any] = {
            "selection": "loso" if use_loso else "validation",
            "candidate": cand,
            "inputs": list(chosen),
            "C": c,
            "validation_auroc": M.auroc(y_va, fit.predict(cols_va)),
            "coef": dict(zip(chosen, [float(x) for x in fit.variant.coef], strict=True)),
        }
        if sel is not None:
            vinfo["loso_worst_auroc"] = sel["choice"]["worst_auroc"]
            vinfo["loso_mean_auroc"] = sel["choice"]["mean_auroc"]
        info["variants"][name] = vinfo
        report["variants"][name] = {
            "available_inputs": list(inputs),
            "candidates": {k: list(v) for k, v in cands.items()},
            "loso": sel,
            "choice": {k: v for k, v in vinfo.items() if k != "coef"},
            "coef": vinfo["coef"],
        }
        say(
            f"risk {name}: {cand} ({', '.join(chosen)}), C {c}, "
            + (f"LOSO worst AUROC {vinfo['loso_worst_auroc']:.3f}, " if sel else "")
            + f"validation AUROC {vinfo['validation_auroc']:.3f}"
        )
    model = RiskModel(ssd.fingerprint, probes, variants, {}, info)
    feats_va = torch.as_tensor(f_va)
    for name in variants:
        p = predict_rows(model, name, cols_va, feats_va)
        calibration[f"risk:{name}"] = sorted(float(v) for v in p if np.isfinite(v))
    model.calibration = calibration
    model.info.update(
        {
            "workdir": str(data.root),
            "n_train": len(tr_rows),
            "n_validation": len(va_rows),
            "train_error_rate": float(y_tr.mean()),
            "seed": seed,
            "folds": folds,
            "sources": sources,
            "selection": report["selection"],
            "loso_rows": report["loso_rows"],
        }
    )
    if cols_te is not None and f_te is not None:
        _test_report(
            report, model, fits, cols_tr, y_tr, src_tr, cols_te, y_te, src_te, f_te,
            held if use_loso else None, sources, seed,
        )  # fmt: skip
    return model, report


def _test_report(
    report: dict[str, Any],
    model: RiskModel,
    fits: Mapping[str, tuple[tuple[str, ...], float]],
    cols_tr: Columns,
    y_tr: np.ndarray,
    src_tr: np.ndarray,
    cols_te: Columns,
    y_te: np.ndarray,
    src_te: np.ndarray,
    f_te: torch.Tensor,
    held: Callable[[str, str], tuple[Columns, np.ndarray]] | None,
    sources: Sequence[str],
    seed: int,
) -> None:
    """Fill each variant's ``test`` (the stored model; every source is in its training
    data) and ``test_loso`` (each source's test rows scored by the variant's chosen
    candidate fitted without that source, its probes too) per source."""
    feats = torch.as_tensor(f_te)
    post_loso: dict[str, np.ndarray] = {}
    for name, (chosen, c) in fits.items():
        inputs = RISK_INPUTS[name]
        comb = predict_rows(model, name, cols_te, feats)
        singles = {n: _signed(cols_tr[n], y_tr, cols_te[n])[0] for n in inputs}
        per = {}
        for s in sorted(set(src_te.tolist())):
            m = src_te == s
            per[s] = compare_to_singles(y_te[m], comb[m], {n: v[m] for n, v in singles.items()})
        rep = report["variants"][name]
        rep["test"] = {
            "what": "the stored model (fitted on every source's training rows)",
            "pooled": compare_to_singles(y_te, comb, singles),
            "per_source": per,
            "combined_ge_best_single_every_source": all(
                r["combined_ge_best_single"] for r in per.values()
            ),
        }
        if held is None:
            continue
        full = tuple(inputs)
        c_full = float(rep["loso"]["candidates"]["full"]["C"])
        per_loso: dict[str, Any] = {}
        for s in sources:
            cols_s, y_s = held("test", s)
            if not len(y_s):
                continue
            keep = np.flatnonzero(src_tr != s)
            sub, y_sub = _rows(cols_tr, keep), y_tr[keep]
            p = _fit_lr(chosen, sub, y_sub, c, seed).predict(cols_s)
            if name == "post":
                post_loso[s] = p
            elif name == "post_gen" and s in post_loso:  # as at run time: no token, post
                missing = np.zeros(len(y_s), dtype=bool)
                for n in TOKEN_STAT_NAMES:
                    missing |= ~np.isfinite(cols_s[n])
                p = np.where(missing, post_loso[s], p)
            sgl = {n: _signed(sub[n], y_sub, cols_s[n])[0] for n in inputs}
            row = compare_to_singles(y_s, p, sgl)
            row["full_set"] = M.auroc(y_s, _fit_lr(full, sub, y_sub, c_full, seed).predict(cols_s))
            per_loso[s] = row
        rep["test_loso"] = {
            "what": (
                "each source's test rows scored by the chosen candidate fitted on the other "
                "sources' training rows (probes refitted without the source); singles "
                "sign-corrected on those training rows; full_set: the full input set at its "
                "LOSO C, for reference"
            ),
            "per_source": per_loso,
            "combined_ge_best_single_every_source": all(
                r["combined_ge_best_single"] for r in per_loso.values()
            ),
        }
