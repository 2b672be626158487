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
   and** ``C`` are chosen by leave-one-source-out (LOSO, issue 18 item 4) when the work
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.scoring.risk import RISK_INPUTS, LinearProbeWeights, RiskModel, RiskVariant
from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES, teacher_forced_token_stats
from ssd_guard.training import metrics as M
from ssd_guard.training.probes import KnowProbe, SemanticEntropyProbe
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats import Stats
from ssd_guard.training.stats_scorers import SSDStatsScorer, features_from_stats

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

Logger = Callable[[str], None]
TOKEN_STATS_FILE = "token_stats.safetensors"
_C_GRID = (0.01, 0.1, 1.0, 10.0)
Columns = dict[str, np.ndarray]

#: The inputs read from the student's hidden states: fitted on the pooled sources, so
#: in-domain by construction; the LOSO selection weighs them by how they carry over.
PROBE_INPUTS: tuple[str, ...] = ("pcp", "sep")

#: Where a held-out source is scored in the LOSO selection.
LOSO_ROWS = ("validation", "train+validation")


def workdir_token_stats(
    data: Any, model: Any, tokenizer: Any, *, chunk: int = 128, log: Logger | None = None
) -> np.ndarray:
    """``[N, 3]`` token statistics of every row's default answer (all splits), computed
    by teacher forcing and cached (resumable, chunk by chunk) in the work directory."""
    from safetensors.numpy import load_file, save_file

    say = log or (lambda m: None)
    path = Path(data.root) / TOKEN_STATS_FILE
    prompts = [str(r.get("text", r["prompt"])) for r in data.prompts]
    default = list(data.stats.default or [])
    n = len(prompts)
    digest = _token_stats_digest(prompts, default, model)
    done = np.full((n, 3), np.nan)
    have = np.zeros(n, dtype=bool)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            stored = (f.metadata() or {}).get("digest")
        if stored == digest:
            t = load_file(str(path))
            done, have = t["values"].astype(np.float64), t["done"].astype(bool)
        else:
            say(
                f"token stats: {path} was computed for other prompts, answers or another "
                "model; computing them again"
            )
    todo = np.flatnonzero(~have)
    t0 = time.perf_counter()
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        done[rows] = teacher_forced_token_stats(
            model, tokenizer, [prompts[i] for i in rows], [default[i] for i in rows]
        )
        have[rows] = True
        save_file(
            {"values": done, "done": have.astype(np.uint8)}, str(path), metadata={"digest": digest}
        )
        say(f"token stats: {int(have.sum())}/{n} rows ({time.perf_counter() - t0:.0f} s)")
    return done


def _token_stats_digest(prompts: Sequence[str], answers: Sequence[str], model: Any) -> str:
    """What the cached token statistics depend on: every row's prompt and default
    answer, and the model (its weights' fingerprint and dtype)."""
    import hashlib
    import json

    from ssd_guard.models import model_fingerprint

    try:
        who = [model_fingerprint(model), str(next(model.parameters()).dtype)]
    except (AttributeError, StopIteration, TypeError):
        who = [type(model).__name__]
    blob = json.dumps([who, list(prompts), list(answers)], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _layer_stats(stats: Stats, features: torch.Tensor, layers: Sequence[int], h: int) -> Stats:
    """A Stats whose ``hidden_layers`` are the student's feature slices (probe inputs)."""
    out = Stats(prompts=stats.prompts, samples=stats.samples)
    out.sample_embeddings = stats.sample_embeddings
    out.hidden_layers = {
        int(ly): features[:, i * h : (i + 1) * h].float() for i, ly in enumerate(layers)
    }
    return out


def _fit_probe(
    kind: str,
    train: Stats,
    y_train: np.ndarray | None,
    val: Stats,
    y_val: np.ndarray | None,
    layers: Sequence[int],
    seed: int,
) -> tuple[Any, float, float]:
    """The probe (layer and C chosen on validation), its C and validation AUROC."""
    best: tuple[float, float, Any] | None = None
    for c in (0.01, 0.05, 0.2):
        probe: Any
        if kind == "pcp":
            probe = KnowProbe(candidate_layers=layers, C=c, seed=seed, name="PCP")
        else:
            se = SemanticEntropy("embedding", threshold=0.8, name="SE-cos")
            probe = SemanticEntropyProbe(
                candidate_layers=layers, entropy=se, C=c, seed=seed, name="SEP"
            )
        probe.fit(train, y_train, validation=(val, y_val))
        score = max(probe.layer_scores_.values())
        if best is None or score > best[0]:
            best = (score, c, probe)
    assert best is not None
    return best[2], best[1], best[0]


def _weights(probe: Any, layers: Sequence[int], h: int) -> LinearProbeWeights:
    i = list(layers).index(int(probe.layer_))
    return LinearProbeWeights(
        start=i * h,
        stop=(i + 1) * h,
        mean=np.asarray(probe.mean_, dtype=np.float64),
        scale=np.asarray(probe.scale_, dtype=np.float64),
        coef=np.asarray(probe.coef_, dtype=np.float64).ravel(),
        intercept=float(np.asarray(probe.intercept_).ravel()[0]),
    )


def _logit(w: LinearProbeWeights, features: torch.Tensor) -> np.ndarray:
    return np.asarray(w.logit(features).double().cpu().numpy())


def risk_inputs(
    ssd: Any,
    stats: Stats,
    probes: dict[str, LinearProbeWeights],
    token_stats: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Every input column for *stats*' rows (probe logits from the given weights)."""
    sc = SSDStatsScorer(ssd)
    feats = features_from_stats(ssd.features, stats)
    cols: dict[str, np.ndarray] = {"entropy": sc.score(stats)}
    for name, w in probes.items():
        cols[name] = _logit(w, feats)
    assert stats.default_embeddings is not None
    for k, v in sc.answer_signals(stats, stats.default_embeddings).items():
        cols[k] = np.asarray(v, dtype=np.float64)
    if token_stats is not None:
        for j, name in enumerate(TOKEN_STAT_NAMES):
            cols[name] = np.asarray(token_stats[:, j], dtype=np.float64)
    return cols


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


def _refit_probe(
    kind: str,
    probe: Any,
    c: float,
    sub: Stats,
    target: np.ndarray,
    layers: Sequence[int],
    h: int,
    seed: int,
) -> LinearProbeWeights:
    """*probe*'s kind, layer and ``C`` (SEP: its SE split) refitted on *sub* (targets:
    PCP the correctness labels, SEP the semantic entropies)."""
    p: Any
    if kind == "pcp":
        p = KnowProbe(int(probe.layer_), C=c, seed=seed)
    else:
        p = SemanticEntropyProbe(int(probe.layer_), threshold=probe.threshold_, C=c)
    p.fit(sub, target)
    return _weights(p, layers, h)


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


def fit_risk(
    data: Any,
    ssd: Any,
    *,
    token_stats: np.ndarray | None,
    seed: int = 0,
    folds: int = 5,
    loso_rows: str = "validation",
    log: Logger | None = None,
) -> RiskModel:
    """Fit the probes and the three variants on *data*'s training split (see the module
    doc); *token_stats* ``[N, 3]`` for every row (``None``: no ``post_gen`` variant)."""
    return fit_risk_with_report(
        data, ssd, token_stats=token_stats, seed=seed, folds=folds, loso_rows=loso_rows, log=log
    )[0]


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


def predict_rows(
    model: RiskModel, variant: str, cols: dict[str, np.ndarray], features: torch.Tensor
) -> np.ndarray:
    """The variant's P(wrong) from stored columns (the probe columns are recomputed from
    *features* with the model's own probe weights)."""
    c = dict(cols)
    for name, w in model.probes.items():
        c[name] = _logit(w, features)
    tcols = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in c.items()}
    return np.asarray(model.predict_columns(tcols, variant).double().numpy())
