"""Fit the combined ``risk`` signal of a student on a work directory (``ssd-guard fit-risk``).

See :mod:`ssd_guard.scoring.risk` for what the signal is. Fitting, on the **training split
only** (selection of the probes' layer and regularisation on validation, nothing on test):

1. PCP and SEP probes (logistic regressions) on each of the student's last-token feature
   layers; the layer and ``C`` with the best validation AUROC are kept (SEP's target is
   the embedding semantic entropy of the teacher's samples, binarised at the training
   split's best split).
2. Out-of-fold probe logits for the training rows (5 folds), so the combiner sees probe
   values as noisy as at run time.
3. One logistic regression per variant (``pre``, ``post``, ``post_gen``) on the
   standardised inputs; ``C`` chosen on validation.
4. ``calibration``: each variant's sorted validation values (for quantile thresholds).

The token statistics of the default answers are computed once per work directory by
teacher forcing and kept in ``<workdir>/token_stats.safetensors`` (resumable).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.evaluation import metrics as M
from ssd_guard.evaluation.baselines.probes import KnowProbe, SemanticEntropyProbe
from ssd_guard.evaluation.baselines.semantic_entropy import SemanticEntropy
from ssd_guard.evaluation.baselines.stats import Stats
from ssd_guard.evaluation.scorers import SSDStatsScorer, features_from_stats
from ssd_guard.scoring.risk import RISK_INPUTS, LinearProbeWeights, RiskModel, RiskVariant
from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES, teacher_forced_token_stats

__all__ = ["fit_risk", "risk_inputs", "workdir_token_stats"]

Logger = Callable[[str], None]
TOKEN_STATS_FILE = "token_stats.safetensors"
_C_GRID = (0.01, 0.1, 1.0, 10.0)


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
    done = np.full((n, 3), np.nan)
    have = np.zeros(n, dtype=bool)
    if path.is_file():
        t = load_file(str(path))
        if t["values"].shape[0] == n:
            done, have = t["values"].astype(np.float64), t["done"].astype(bool)
    todo = np.flatnonzero(~have)
    t0 = time.perf_counter()
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        done[rows] = teacher_forced_token_stats(
            model, tokenizer, [prompts[i] for i in rows], [default[i] for i in rows]
        )
        have[rows] = True
        save_file({"values": done, "done": have.astype(np.uint8)}, str(path))
        say(f"token stats: {int(have.sum())}/{n} rows ({time.perf_counter() - t0:.0f} s)")
    return done


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


def _fit_variant(
    names: Sequence[str],
    tr: dict[str, np.ndarray],
    y_tr: np.ndarray,
    va: dict[str, np.ndarray],
    y_va: np.ndarray,
    seed: int,
) -> tuple[RiskVariant, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    x_tr = np.stack([tr[n] for n in names], axis=-1)
    x_va = np.stack([va[n] for n in names], axis=-1)
    # An empty default answer has no token statistics: the training rows' mean stands in.
    fill = np.nanmean(x_tr, axis=0)
    x_tr = np.where(np.isfinite(x_tr), x_tr, fill)
    x_va = np.where(np.isfinite(x_va), x_va, fill)
    mean, scale = x_tr.mean(0), x_tr.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z_tr, z_va = (x_tr - mean) / scale, (x_va - mean) / scale
    best: tuple[float, float, Any] | None = None
    for c in _C_GRID:
        lr = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(z_tr, y_tr)
        a = M.auroc(y_va, lr.predict_proba(z_va)[:, 1])
        if best is None or a > best[0]:
            best = (a, c, lr)
    assert best is not None
    lr = best[2]
    variant = RiskVariant(
        inputs=tuple(names),
        mean=mean,
        scale=scale,
        coef=np.asarray(lr.coef_[0], dtype=np.float64),
        intercept=float(lr.intercept_[0]),
    )
    info = {
        "C": best[1],
        "validation_auroc": best[0],
        "coef": dict(zip(names, [float(c) for c in lr.coef_[0]], strict=True)),
    }
    return variant, info


def fit_risk(
    data: Any,
    ssd: Any,
    *,
    token_stats: np.ndarray | None,
    seed: int = 0,
    folds: int = 5,
    log: Logger | None = None,
) -> RiskModel:
    """Fit the probes and the three variants on *data*'s training split (see the module
    doc); *token_stats* ``[N, 3]`` for every row (``None``: no ``post_gen`` variant)."""
    say = log or (lambda m: None)
    spec = ssd.features
    if spec.pooled_layers:
        raise ValueError("the risk probes read last-token features; this student reads pooled")
    layers = list(spec.layers)
    tr_rows, va_rows = data.split["train"], data.split["validation"]
    train, val = data.stats.subset(tr_rows), data.stats.subset(va_rows)
    f_tr = features_from_stats(spec, train)
    f_va = features_from_stats(spec, val)
    h = f_tr.shape[1] // len(layers)  # last-token states only: one hidden size per layer
    y_tr = ~np.asarray(data.correct[tr_rows], dtype=bool)
    y_va = ~np.asarray(data.correct[va_rows], dtype=bool)
    ls_tr, ls_va = _layer_stats(train, f_tr, layers, h), _layer_stats(val, f_va, layers, h)
    probes: dict[str, LinearProbeWeights] = {}
    info: dict[str, Any] = {"probes": {}, "variants": {}}
    oof: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(tr_rows)) % folds
    for kind in ("pcp", "sep"):
        t0 = time.perf_counter()
        y_t = None if kind == "sep" else ~y_tr
        y_v = None if kind == "sep" else ~y_va
        probe, c, score = _fit_probe(kind, ls_tr, y_t, ls_va, y_v, layers, seed)
        probes[kind] = _weights(probe, layers, h)
        # Out-of-fold logits for the combiner's training rows (same layer, C, SE split).
        pred = np.zeros(len(tr_rows))
        se_all = probe.entropy.score(ls_tr) if kind == "sep" else None
        for f in range(folds):
            sub_tr, sub_te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            sub = ls_tr.subset(sub_tr)
            if kind == "pcp":
                p2: Any = KnowProbe(int(probe.layer_), C=c, seed=seed)
                p2.fit(sub, ~y_tr[sub_tr])
            else:
                assert se_all is not None
                p2 = SemanticEntropyProbe(int(probe.layer_), threshold=probe.threshold_, C=c)
                p2.fit(sub, se_all[sub_tr])
            pred[sub_te] = _logit(_weights(p2, layers, h), f_tr[sub_te])
        oof[kind] = pred
        info["probes"][kind] = {
            "layer": int(probe.layer_),
            "C": c,
            "validation_auroc_of_own_target": score,
            "seconds": time.perf_counter() - t0,
        }
        say(f"{kind}: layer {probe.layer_}, C {c}, validation AUROC {score:.3f}")
    ts_tr = None if token_stats is None else token_stats[tr_rows]
    ts_va = None if token_stats is None else token_stats[va_rows]
    cols_tr = risk_inputs(ssd, train, probes, ts_tr)
    cols_tr.update(oof)
    cols_va = risk_inputs(ssd, val, probes, ts_va)
    variants: dict[str, RiskVariant] = {}
    calibration: dict[str, list[float]] = {}
    for name, inputs in RISK_INPUTS.items():
        if name == "post_gen" and token_stats is None:
            continue
        variants[name], vinfo = _fit_variant(inputs, cols_tr, y_tr, cols_va, y_va, seed)
        info["variants"][name] = vinfo
        say(f"risk {name}: validation AUROC {vinfo['validation_auroc']:.3f}, C {vinfo['C']}")
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
        }
    )
    return model


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
