"""The ``student`` stage: the heads' grid search, the marginal, calibration and the artifact."""

from __future__ import annotations

import itertools
import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.errors import ConfigError
from ssd_guard.features import FeatureSpec
from ssd_guard.training.distill.loaders import (
    _split_index,
    load_features,
    load_pca,
    load_pooled,
    teacher_dispersion,
)
from ssd_guard.training.distill.workdir import _atomic_write_text, load_prompts, prefix_length
from ssd_guard.training.metrics import spearman

if TYPE_CHECKING:
    from ssd_guard.training.distill.workdir import Context, Workdir


#: The student recipe's training settings :class:`SSDStudent` takes as they are.
_TRAINING_KEYS = {"dropout", "lr", "weight_decay", "max_epochs", "patience", "batch_size"}


def feature_spec(ctx: Context, best_layer: int) -> FeatureSpec:
    """The student's input: the recipe's ``layers.last`` / ``layers.pooled``, else the
    probe-selected layer alone."""
    lc = ctx.recipe.layers
    if lc.last is None and lc.pooled is None:
        return FeatureSpec.single(best_layer)
    pool_start = prefix_length(ctx.lm.tokenizer, ctx.recipe.prompt.few_shot) if lc.pooled else 0
    return FeatureSpec(layers=lc.last or [], pooled_layers=lc.pooled or [], pool_start=pool_start)


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
                **sc.model_dump(include=_TRAINING_KEYS),
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
