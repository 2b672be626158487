"""Distillation stages after teacher sampling: labels, embeddings + PCA, features,
layer selection and student training (which writes the artifact)."""

from __future__ import annotations

import importlib
import itertools
import json
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.answers import answer_core, grade_choice, normalise_answer, question_of
from ssd_guard.encoding import AnswerEmbedder, PCAProjection
from ssd_guard.errors import ConfigError
from ssd_guard.features import FeatureSpec
from ssd_guard.training.distill.data import is_correct
from ssd_guard.training.distill.workdir import (
    _atomic_save,
    _atomic_write_text,
    load_prompts,
    load_teacher,
    load_teacher_all,
    prefix_length,
)
from ssd_guard.training.metrics import spearman

if TYPE_CHECKING:
    from ssd_guard.training.distill.workdir import Context, Workdir

log = logging.getLogger("ssd_guard.training.distill")


def _ordered_teacher(
    wd: Workdir,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor]:
    prompts = load_prompts(wd)
    records, hidden = load_teacher(wd)
    if [r["id"] for r in records] != [p["id"] for p in prompts]:
        raise ConfigError(
            f"{wd.root}: teacher shards do not cover prompts.jsonl in order; rerun --force teacher"
        )
    return prompts, records, hidden


def _split_index(wd: Workdir, prompts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    splits = wd.read_json("split.json")
    pos = {p["id"]: i for i, p in enumerate(prompts)}
    return {k: np.array([pos[i] for i in v], dtype=np.int64) for k, v in splits.items()}


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


def load_labels(wd: Workdir) -> list[dict[str, Any]]:
    with wd.path("labels.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


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


def load_pca(wd: Workdir) -> PCAProjection:
    return PCAProjection.from_tensors(load_file(str(wd.path("pca.safetensors"))), prefix="")


def teacher_dispersion(samples: torch.Tensor) -> torch.Tensor:
    """TD: mean per-dimension standard deviation of each prompt's K answer embeddings."""
    return samples.float().std(dim=1, unbiased=True).mean(dim=-1)


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


def load_features(wd: Workdir) -> torch.Tensor:
    return load_file(str(wd.path("features.safetensors")))["hidden"]


def load_pooled(wd: Workdir) -> torch.Tensor | None:
    return load_file(str(wd.path("features.safetensors"))).get("pooled")


def feature_spec(ctx: Context, best_layer: int) -> FeatureSpec:
    """The student's input: the recipe's ``layers.last`` / ``layers.pooled``, else the
    probe-selected layer alone."""
    lc = ctx.recipe.layers
    if lc.last is None and lc.pooled is None:
        return FeatureSpec.single(best_layer)
    pool_start = prefix_length(ctx.lm.tokenizer, ctx.recipe.prompt.few_shot) if lc.pooled else 0
    return FeatureSpec(layers=lc.last or [], pooled_layers=lc.pooled or [], pool_start=pool_start)


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


# --------------------------------------------------------------------------- student + artifact
def fit_marginal(
    z: torch.Tensor, n_components: int, seed: int, min_scale: float = 0.0
) -> dict[str, torch.Tensor]:
    """An unconditional diagonal Gaussian mixture over answer targets ``[M, d]``
    (scikit-learn EM), stored as ``marginal.{weights,means,scales}``."""
    from sklearn.mixture import GaussianMixture as SkGMM

    x = z.double().numpy()
    gmm = SkGMM(
        n_components=min(n_components, max(1, x.shape[0] // 10)),
        covariance_type="diag",
        reg_covar=1e-4,
        random_state=seed,
        max_iter=300,
    ).fit(x)
    return {
        "marginal.weights": torch.from_numpy(gmm.weights_).float(),
        "marginal.means": torch.from_numpy(gmm.means_).float(),
        "marginal.scales": torch.from_numpy(np.sqrt(gmm.covariances_)).float().clamp_min(min_scale),
    }


def source_mask(
    prompts: list[dict[str, Any]], index: np.ndarray, names: list[str] | None
) -> np.ndarray:
    if names is None:
        return index
    wanted = set(names)
    known = {p.get("source") for p in prompts}
    unknown = wanted - known
    if unknown:
        have = sorted(str(k) for k in known if k)
        raise ConfigError(f"student.train_sources: unknown {sorted(unknown)}; have {have}")
    return np.array([i for i in index if prompts[i].get("source") in wanted], dtype=np.int64)


def stage_student(wd: Workdir, ctx: Context, progress: bool = True) -> dict[str, Any]:
    from ssd_guard.artifact import (
        AnswerInfo,
        BaseModelInfo,
        EmbedderInfo,
        HeadInfo,
        Manifest,
        PromptFormat,
        save_artifact,
    )
    from ssd_guard.student import SSDStudent

    r = ctx.recipe
    sc = r.student
    prompts = load_prompts(wd)
    idx = _split_index(wd, prompts)
    tr = source_mask(prompts, idx["train"], sc.train_sources)
    va = source_mask(prompts, idx["validation"], sc.train_sources)
    best_layer = int(wd.read_json("layers.json")["best"])
    spec = feature_spec(ctx, best_layer)
    hidden_all = load_features(wd)
    pooled_all = load_pooled(wd)
    if spec.pooled_layers and pooled_all is None:
        raise ConfigError("layers.pooled needs pooled teacher states: set teacher.pool: true")
    x_all = spec.assemble(hidden_all, pooled_all)
    emb = load_file(str(wd.path("embeddings.safetensors")))
    pca = load_pca(wd)
    z_all = pca.transform(emb["samples"])  # [N, S, D]
    z_default = pca.transform(emb["default"])  # [N, D]
    td = teacher_dispersion(emb["samples"])  # [N], raw embedding space (TD-std)
    dims = {"risk": r.embedding.pca_dim_risk, "answer": r.embedding.pca_dim_answer}
    floors = {"risk": sc.min_scale_risk, "answer": sc.min_scale_answer}
    grid = list(itertools.product(sc.grid.n_components, sc.grid.hidden, sc.grid.depth))
    device = ctx.device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid) * len(dims), desc="student grid", unit="fit")
    heads: dict[str, SSDStudent] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    # Heads trained on plain PCA coordinates although the stored PCA whitens.
    unwhiten = {"risk": r.embedding.whiten and not sc.whiten_risk, "answer": False}
    td_va = td[va].numpy()
    for head, d in dims.items():
        z = z_all[..., :d]
        if unwhiten[head]:
            z = z * pca.scale[:d]
        rank = sc.rank_weight if head == "risk" else 0.0
        rows = []
        best: SSDStudent | None = None
        best_key = math.inf
        for k, h, depth in grid:
            st = SSDStudent(
                k,
                h,
                depth,
                dropout=sc.dropout,
                lr=sc.lr,
                weight_decay=sc.weight_decay,
                max_epochs=sc.max_epochs,
                patience=sc.patience,
                batch_size=sc.batch_size,
                min_scale=floors[head],
                rank_weight=rank,
                seed=sc.seed,
                device=device,
            ).fit(
                x_all[tr],
                z[tr],
                x_all[va],
                z[va],
                dispersion=td[tr] if rank else None,
                dispersion_val=td[va] if rank else None,
            )
            row: dict[str, Any] = {
                "n_components": k,
                "hidden": h,
                "depth": depth,
                "val_nll": round(st.nll(x_all[va], z[va]), 5),
                "epochs": st.history_.best_epoch + 1,
            }
            key = row["val_nll"]
            if head == "risk":
                ent = st.predict(x_all[va]).renyi2_entropy().cpu().numpy()
                row["val_fidelity"] = round(spearman(ent, td_va), 4)
                if sc.select_by == "val_fidelity":
                    key = -row["val_fidelity"]
            rows.append(row)
            if best is None or key < best_key:
                best, best_key = st, key
            if bar is not None:
                bar.update(1)
        assert best is not None
        if sc.half_weights:
            with torch.no_grad():
                for param in best.model_.parameters():
                    if param.dim() == 2:
                        param.copy_(param.half().float())
        heads[head] = best
        results[head] = rows
    if bar is not None:
        bar.close()
    _atomic_write_text(wd.path("student_grid.json"), json.dumps(results, indent=2))

    tensors: dict[str, torch.Tensor] = dict(pca.tensors())
    for name, st in heads.items():
        for key, v in st.state_tensors().items():
            half = sc.half_weights and v.dim() == 2  # weight matrices, already rounded
            tensors[f"heads.{name}.{key}"] = v.half() if half else v
    d_ans = dims["answer"]
    if sc.marginal_components > 0:
        z_tr = torch.cat([z_all[tr, :, :d_ans].reshape(-1, d_ans), z_default[tr, :d_ans]])
        tensors.update(fit_marginal(z_tr, sc.marginal_components, sc.seed, sc.marginal_min_scale))

    # Calibration: validation entropies and the validation default answers' signals.
    with torch.no_grad():
        ent_val = heads["risk"].predict(x_all[va]).renyi2_entropy().cpu()
        mix = heads["answer"].predict(x_all[va])
        zd = z_default[va, :d_ans].to(mix.means.device)
        ll_val = mix.log_prob(zd).cpu()
        cons_val = -(zd - mix.mean()).pow(2).sum(-1).sqrt().cpu()
        if sc.marginal_components > 0:
            from ssd_guard.scoring.ssd import load_marginal

            marg = load_marginal(tensors)
            assert marg is not None
            pmi_val = ll_val - marg.log_prob(zd.cpu().unsqueeze(0))[0]
        else:
            pmi_val = ll_val
    tensors["calibration.entropy"] = ent_val.sort().values.float()
    tensors["calibration.loglik"] = ll_val.sort().values.float()
    tensors["calibration.pmi"] = pmi_val.sort().values.float()
    tensors["calibration.consensus"] = cons_val.sort().values.float()

    teacher_info = wd.read_json("stages", "teacher.done.json")
    labels_info = wd.read_json("stages", "labels.done.json")
    sources = sorted({str(prompts[i].get("source", r.name)) for i in tr})
    manifest = Manifest(
        base_model=BaseModelInfo(
            id=teacher_info["model_id"],
            fingerprint=teacher_info["fingerprint"],
            hidden_size=int(hidden_all.shape[2]),
            num_layers=int(hidden_all.shape[1] - 1),
        ),
        layer=spec.deepest,
        features=None if spec == FeatureSpec.single(spec.deepest) else spec,
        embedder=EmbedderInfo(id=r.embedding.embedder, dim=int(emb["default"].shape[1])),
        pca_dim=pca.dim,
        heads={
            name: HeadInfo(
                dim=dims[name],
                n_components=st.n_components,
                hidden=st.hidden,
                depth=st.depth,
                min_scale=st.min_scale,
                val_nll=round(st.best_val_nll_, 5),
                whitened=bool(r.embedding.whiten and not unwhiten[name]),
            )
            for name, st in heads.items()
        },
        prompt=PromptFormat(
            few_shot=r.prompt.few_shot,
            template=r.prompt.template.replace("{prompt}", "Question: {question}\nAnswer:"),
            chat=r.prompt.chat,
            system=r.prompt.system,
        ),
        answers=AnswerInfo(
            normalise=r.embedding.normalise,
            core_span=sc.core_span,
            marginal=sc.marginal_components > 0,
            default_signal=sc.answer_signal,
            core_embed=r.embedding.core,
        ),
        training={
            "recipe": r.name,
            "data": r.data.path or [s.name for s in (r.data.sources or [])],
            "trained_on_sources": sources,
            "n_train": len(tr),
            "n_validation": len(va),
            "n_test": len(idx["test"]),
            "teacher": r.teacher.model_dump(),
            "greedy_accuracy": labels_info.get("greedy_accuracy"),
            "accuracy_by_split": labels_info.get("accuracy_by_split"),
            "val_nll": {name: round(st.best_val_nll_, 5) for name, st in heads.items()},
            "probe_layer": best_layer,
            "features": spec.describe(),
            "rank_weight": sc.rank_weight,
            "select_by": sc.select_by,
            "weights_dtype": "float16" if sc.half_weights else "float32",
        },
    )
    out = r.resolve(r.artifact) if r.artifact else wd.path("artifact")
    save_artifact(out, manifest, tensors)
    return {
        "artifact": str(out),
        "layer": spec.deepest,
        "features": spec.describe(),
        "heads": {
            n: {
                "n_components": s.n_components,
                "hidden": s.hidden,
                "depth": s.depth,
                "val_nll": round(s.best_val_nll_, 5),
            }
            for n, s in heads.items()
        },
    }
