"""Distillation stages after teacher sampling: labels, embeddings + PCA, features,
layer selection and student training (which writes the artifact).

The student stage lives in :mod:`.student`, the loaders of the stages' outputs in
:mod:`.loaders`; both are re-exported here."""

from __future__ import annotations

import importlib
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.answers import answer_core, grade_choice, normalise_answer, question_of
from ssd_guard.encoding import AnswerEmbedder, PCAProjection
from ssd_guard.errors import ConfigError
from ssd_guard.training.distill.data import is_correct
from ssd_guard.training.distill.loaders import (
    _ordered_teacher,
    _split_index,
    load_features,
    teacher_dispersion,
)
from ssd_guard.training.distill.loaders import load_labels as load_labels
from ssd_guard.training.distill.loaders import load_pca as load_pca
from ssd_guard.training.distill.loaders import load_pooled as load_pooled
from ssd_guard.training.distill.student import feature_spec as feature_spec
from ssd_guard.training.distill.student import fit_marginal as fit_marginal
from ssd_guard.training.distill.student import source_mask as source_mask
from ssd_guard.training.distill.student import stage_student as stage_student
from ssd_guard.training.distill.workdir import (
    _atomic_save,
    _atomic_write_text,
    load_prompts,
    load_teacher_all,
)

if TYPE_CHECKING:
    from ssd_guard.training.distill.workdir import Context, Workdir

log = logging.getLogger("ssd_guard.training.distill")


# --------------------------------------------------------------------------- labels
def _judge(spec: str) -> Any:
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"labels.judge: cannot import {spec!r}: {exc}") from exc


def stage_labels(wd: Workdir, ctx: Context) -> dict[str, Any]:
    cfg = ctx.recipe.labels
    prompts, records, _ = _ordered_teacher(wd)
    judge = _judge(cfg.judge) if cfg.method == "judge" and cfg.judge else None
    rows = []
    for p, r in zip(prompts, records):
        aliases = p.get("aliases") or ([p["choices"][p["gold"]]] if "choices" in p else [])
        if judge is not None:
            ok = bool(judge(p["prompt"], r["default"], aliases))
        elif p.get("grade") == "choice":
            lettered = [c.lower() for c in p["choices"]] != ["yes", "no"]
            ok = grade_choice(r["default"], p["choices"], lettered) == p["gold"]
        else:
            ok = is_correct(r["default"], aliases, containment=cfg.containment)
        rows.append({"id": p["id"], "correct": ok, "default": r["default"]})
    _atomic_write_text(wd.path("labels.jsonl"), "".join(json.dumps(x) + "\n" for x in rows))
    idx = _split_index(wd, prompts)
    correct = np.array([x["correct"] for x in rows])
    acc = {k: float(correct[v].mean()) if len(v) else float("nan") for k, v in idx.items()}
    empty = sum(1 for r in records for s in [r["default"], *r["samples"]] if not s)
    return {
        "greedy_accuracy": float(correct.mean()),
        "accuracy_by_split": acc,
        "empty_answers": empty,
    }


# --------------------------------------------------------------------------- embeddings + PCA
def stage_embed(wd: Workdir, ctx: Context) -> dict[str, Any]:
    cfg = ctx.recipe.embedding
    prompts, records, _ = _ordered_teacher(wd)
    emb = AnswerEmbedder(ctx.embedder, batch_size=cfg.batch_size)
    n, s = len(records), len(records[0]["samples"])
    texts = [t for r in records for t in (r["default"], *r["samples"])]
    if cfg.core:  # what each answer says beyond restating its question
        questions = [question_of(p["prompt"]) for p in prompts for _ in range(s + 1)]
        texts = [answer_core(q, t) for q, t in zip(questions, texts)]
    elif cfg.normalise:
        texts = [normalise_answer(t) for t in texts]
    raw = emb.embed_raw(texts).view(n, s + 1, -1)
    default, samples = raw[:, 0].contiguous(), raw[:, 1:].contiguous()
    _atomic_save({"default": default, "samples": samples}, wd.path("embeddings.safetensors"))
    train = _split_index(wd, prompts)["train"]
    fit_on = torch.cat([samples[train].reshape(-1, raw.shape[-1]), default[train]])
    pca = PCAProjection.fit(fit_on, cfg.pca_dim_answer, whiten=cfg.whiten)
    _atomic_save(pca.tensors(prefix=""), wd.path("pca.safetensors"))
    centred = fit_on.double() - fit_on.double().mean(0)
    total_var = float(centred.pow(2).sum() / (fit_on.shape[0] - 1))
    proj_var = float(pca.transform(fit_on).mul(pca.scale).double().var(0).sum())
    return {
        "n_answers": len(texts),
        "embedding_dim": int(raw.shape[-1]),
        "pca_dim": pca.dim,
        "explained_variance": round(proj_var / total_var, 4),
    }


# --------------------------------------------------------------------------- features
def stage_features(wd: Workdir, ctx: Context) -> dict[str, Any]:
    _, _, hidden = _ordered_teacher(wd)
    _, _, pooled = load_teacher_all(wd)
    cand = ctx.recipe.layers.candidates
    n_layers = hidden.shape[1] - 1
    if cand is not None:
        bad = [c for c in cand if not 0 <= c <= n_layers]
        if bad:
            raise ConfigError(f"layers.candidates: {bad} out of range 0..{n_layers} for this model")
    tensors = {"hidden": hidden}
    if pooled is not None:
        tensors["pooled"] = pooled
    _atomic_save(tensors, wd.path("features.safetensors"))
    return {
        "pooled": pooled is not None,
        "n_prompts": int(hidden.shape[0]),
        "n_layers": n_layers,
        "hidden_size": int(hidden.shape[2]),
    }


# --------------------------------------------------------------------------- layer selection
def best_binary_split(values: np.ndarray) -> float:
    """Threshold minimising the within-group squared error of a 1-D split (as in SEP)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size < 2 or v[0] == v[-1]:
        return float(v[0]) if v.size else 0.0
    csum, csq = np.cumsum(v), np.cumsum(v * v)
    n = v.size
    best, thr = np.inf, float(v[0])
    for i in range(1, n):
        if v[i] == v[i - 1]:
            continue
        left = csq[i - 1] - csum[i - 1] ** 2 / i
        right = (csq[-1] - csq[i - 1]) - (csum[-1] - csum[i - 1]) ** 2 / (n - i)
        if left + right < best:
            best, thr = left + right, float((v[i] + v[i - 1]) / 2)
    return thr


def probe_layers(
    hidden: torch.Tensor,
    target: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    layers: list[int],
    seed: int = 0,
) -> list[dict[str, float]]:
    """A logistic-regression probe per layer: validation accuracy and AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    table = []
    for layer in layers:
        x = hidden[:, layer].float().numpy()
        scaler = StandardScaler().fit(x[train])
        clf = LogisticRegression(C=0.05, max_iter=2000, random_state=seed)
        clf.fit(scaler.transform(x[train]), target[train])
        p = clf.predict_proba(scaler.transform(x[val]))[:, 1]
        auroc = (
            float(roc_auc_score(target[val], p))
            if len(set(target[val].tolist())) > 1
            else float("nan")
        )
        acc = float(((p > 0.5) == target[val]).mean())
        table.append({"layer": layer, "val_accuracy": round(acc, 4), "val_auroc": round(auroc, 4)})
    return table


def stage_layers(wd: Workdir, ctx: Context) -> dict[str, Any]:
    prompts = load_prompts(wd)
    idx = _split_index(wd, prompts)
    hidden = load_features(wd)
    n_layers = hidden.shape[1] - 1
    fixed = ctx.recipe.layers.fixed
    if fixed is not None and not 0 <= fixed <= n_layers:
        raise ConfigError(f"layers.fixed: {fixed} is out of range 0..{n_layers} for this model")
    samples = load_file(str(wd.path("embeddings.safetensors")))["samples"]
    td = teacher_dispersion(samples).numpy()
    thr = best_binary_split(td[idx["train"]])
    target = (td > thr).astype(np.int64)
    cands = ctx.recipe.layers.candidates or list(range(1, n_layers + 1))
    table: list[dict[str, float]] = []
    if fixed is None:
        if len(set(target[idx["train"]].tolist())) < 2:
            raise ConfigError(
                "teacher dispersion is constant on the training split; cannot select a layer"
            )
        table = probe_layers(
            hidden, target, idx["train"], idx["validation"], cands, ctx.recipe.student.seed
        )
        key = [
            (-(r["val_auroc"] if r["val_auroc"] == r["val_auroc"] else 0), r["layer"])
            for r in table
        ]
        best = int(table[key.index(min(key))]["layer"])
    else:
        best = fixed
    result = {
        "best": best,
        "td_threshold": thr,
        "positive_rate": float(target.mean()),
        "table": table,
    }
    _atomic_write_text(wd.path("layers.json"), json.dumps(result, indent=2))
    return {"best": best, "td_threshold": round(thr, 5)}
