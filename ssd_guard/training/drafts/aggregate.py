"""The ``assemble`` stage: drafts scored by the scorer, the logistic regression, the artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.training.distill.workdir import Workdir
from ssd_guard.training.drafts.data import DraftContext, _read_jsonl, stage_names
from ssd_guard.training.drafts.recipe import DraftRecipe


# --------------------------------------------------------------------------- assemble
def _labels(data_dir: Path) -> dict[str, dict[str, Any]]:
    return {x["id"]: x for x in _read_jsonl(data_dir / "labels.jsonl")}


def assemble_tensors(
    wd: Workdir, recipe: DraftRecipe, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for k in range(recipe.n_drafts):
        for n, v in load_file(str(wd.path("drafts", f"draft-{k}.safetensors"))).items():
            tensors[f"draft.{k}.{n}"] = v.to(dtype)
    for n, v in load_file(str(wd.path("drafts", "proxy.safetensors"))).items():
        tensors[f"proxy.{n}"] = v.to(dtype)
    return tensors


def stage_assemble(
    wd: Workdir, ctx: DraftContext, progress: bool = True, key: str = ""
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from ssd_guard.artifact import BaseModelInfo
    from ssd_guard.drafts.artifact import (
        AggregateInfo,
        DraftManifest,
        DraftPrompt,
        ProxyInfo,
        save_draft_artifact,
    )
    from ssd_guard.scoring.draft_eu import FEATURES, DraftEUScorer, lr_probability

    r = ctx.recipe
    lm = ctx.lm
    parts = ctx.parts
    data = wd.read_json("data.json")
    storage = torch.bfloat16 if parts.dtype == torch.bfloat16 else torch.float32
    tensors = assemble_tensors(wd, r, storage)
    n_feat = len(r.aggregate.features)
    # placeholder regression so the scorer can be built; replaced below
    tensors.update(
        {
            "lr.mean": torch.zeros(n_feat, dtype=torch.float64),
            "lr.scale": torch.ones(n_feat, dtype=torch.float64),
            "lr.coef": torch.zeros(n_feat, dtype=torch.float64),
            "lr.intercept": torch.zeros(1, dtype=torch.float64),
        }
    )
    manifest = DraftManifest(
        base_model=BaseModelInfo(
            id=lm.model_id,
            fingerprint=lm.fingerprint,
            hidden_size=parts.hidden_size,
            num_layers=parts.num_layers,
        ),
        layers=list(r.draft.layers),
        n_drafts=r.n_drafts,
        prompt_partitions=r.draft.prompt_partitions,
        response_partitions=r.draft.response_partitions,
        proxy=ProxyInfo(
            noise_scale=r.proxy.noise_scale,
            rank=r.proxy.rank,
            perturb_layers=r.proxy.perturb_layers,
            perturb_head=r.proxy.perturb_head,
        ),
        prompt=DraftPrompt(few_shot=data["few_shot"]),
        max_answer_tokens=r.data.max_answer_tokens,
        aggregate=AggregateInfo(
            features=list(r.aggregate.features), log_features=r.aggregate.log_features
        ),
        storage_dtype=str(storage).replace("torch.", ""),
    )
    scorer = DraftEUScorer(manifest, tensors, lm, batch_size=r.aggregate.batch_size)
    prompts = {p["id"]: p for p in _read_jsonl(ctx.data_dir / "prompts.jsonl")}
    labels = _labels(ctx.data_dir)

    def feats(ids: list[str], desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ids = [i for i in ids if i in labels]
        out = np.full((len(ids), len(FEATURES)), np.nan)
        bs = 64
        it: Any = range(0, len(ids), bs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc, unit="batch")
        for s in it:
            chunk = ids[s : s + bs]
            out[s : s + bs] = scorer.sequence_features(
                [prompts[i]["text"] for i in chunk],
                [labels[i]["default"] for i in chunk],
                formatted=True,
            )
        y = np.array([0.0 if labels[i]["correct"] else 1.0 for i in ids])
        return out, y, ids

    # features depend on the drafts (the stage key): a new key never reuses old ones
    cached = wd.path(f"features-{key}.npz")
    if cached.exists():
        z = np.load(cached, allow_pickle=False)
        f_fit, y_fit, f_val, y_val = z["f_fit"], z["y_fit"], z["f_val"], z["y_val"]
    else:
        f_fit, y_fit, _ = feats(data["fit_ids"], "features (LR fit)")
        f_val, y_val, _ = feats(data["validation_ids"], "features (validation)")
        np.savez(cached, f_fit=f_fit, y_fit=y_fit, f_val=f_val, y_val=y_val)
    cols = [FEATURES.index(f) for f in r.aggregate.features]
    ok = ~np.isnan(f_fit).any(axis=1)
    x = f_fit[ok][:, cols]
    x = np.log(x + 1e-6) if r.aggregate.log_features else x
    mean, scale = x.mean(0), x.std(0) + 1e-12
    clf = LogisticRegression(C=r.aggregate.C, max_iter=1000)
    clf.fit((x - mean) / scale, y_fit[ok])
    tensors["lr.mean"] = torch.tensor(mean, dtype=torch.float64)
    tensors["lr.scale"] = torch.tensor(scale, dtype=torch.float64)
    tensors["lr.coef"] = torch.tensor(clf.coef_[0], dtype=torch.float64)
    tensors["lr.intercept"] = torch.tensor(clf.intercept_, dtype=torch.float64)
    vok = ~np.isnan(f_val).any(axis=1)
    p_val = lr_probability(f_val[vok][:, cols], tensors, r.aggregate.log_features)
    tensors["calibration.draft_eu"] = torch.tensor(np.sort(p_val), dtype=torch.float64)
    from ssd_guard.training.metrics import auroc

    stats = {
        "val_jsd_mean": float(np.nanmean(f_val[:, FEATURES.index("jsd_mean")])),
        "val_kl_mean": float(np.nanmean(f_val[:, FEATURES.index("kl_mean")])),
        "val_eu_mean": float(np.nanmean(f_val[:, FEATURES.index("eu_mean")])),
        "val_auroc_draft_eu": auroc(y_val[vok], p_val),
        "n_fit": int(ok.sum()),
        "n_validation": int(vok.sum()),
        "lr_coef": [float(c) for c in clf.coef_[0]],
    }
    markers = {}
    for name in stage_names(r):
        m = wd.marker(name)
        if m.exists():
            markers[name] = json.loads(m.read_text())
    manifest = manifest.model_copy(
        update={
            "training": {
                "recipe": r.name,
                "data_dir": r.data_dir,
                "distill_prompts": len(data["rows"]),
                "stages": {
                    k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in markers.items()
                },
                **stats,
            }
        }
    )
    out = Path(r.artifact) if r.artifact else wd.path("artifact")
    save_draft_artifact(out, manifest, tensors)
    size = sum(p.stat().st_size for p in out.iterdir())
    return {**stats, "artifact": str(out), "artifact_bytes": size}
