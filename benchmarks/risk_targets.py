"""Plain vs whitened PCA targets for the SSD heads, on the VALIDATION split only.

    python benchmarks/risk_targets.py --workdir runs/smollm2-triviaqa   # ~4 min on 2 CPU cores

Needs a complete ``ssd-guard distill`` work directory. For each seed it fits the risk head
(recipe-default K=10, H=128, D=4) on whitened and on plain PCA coordinates and reports the
validation AUROC of its Rényi-2 entropy against "the default answer is wrong" and its
Spearman correlation with teacher dispersion; then the answer head (32 dims) on both
target spaces with the validation mismatch AUROC (own default answer vs another prompt's).
This is the experiment behind ``student.whiten_risk: false``. Writes
``benchmarks/results/risk-targets-<workdir name>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.student import SSDStudent
from ssd_guard.training.distill.stages_late import _split_index, load_features, load_pca
from ssd_guard.training.distill.workdir import Workdir, load_prompts
from ssd_guard.training.metrics import auroc, spearman

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-triviaqa")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--answer-seeds", default="0,1")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)

    wd = Workdir(args.workdir)
    prompts = load_prompts(wd)
    idx = _split_index(wd, prompts)
    tr, va = idx["train"], idx["validation"]
    labels = {}
    with wd.path("labels.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            labels[row["id"]] = bool(row["correct"])
    wrong = np.array([not labels[p["id"]] for p in prompts])[va]
    layer = int(wd.read_json("layers.json")["best"])
    x = load_features(wd)[:, layer].float()
    emb = load_file(str(wd.path("embeddings.safetensors")))
    pca = load_pca(wd)
    td = emb["samples"].float().std(1).mean(-1).numpy()[va]
    z_white = pca.transform(emb["samples"])
    z_default = pca.transform(emb["default"])
    spaces = {"whitened": 1.0, "plain": pca.scale}

    out: dict[str, Any] = {"workdir": str(args.workdir), "layer": layer, "split": "validation"}
    risk: dict[str, list[dict[str, float]]] = {k: [] for k in spaces}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, scale in spaces.items():
            z = (z_white * scale)[..., :16]
            st = SSDStudent(10, 128, 4, seed=seed, device="cpu").fit(x[tr], z[tr], x[va], z[va])
            with torch.no_grad():
                ent = st.predict(x[va]).renyi2_entropy().numpy()
            row = {
                "seed": seed,
                "val_nll": round(st.best_val_nll_, 4),
                "auroc": round(float(auroc(wrong, ent)), 4),
                "spearman_td": round(spearman(ent, td), 4),
            }
            risk[name].append(row)
            print("risk", name, row, flush=True)
    out["risk_head"] = {
        k: {"runs": v, "mean_auroc": round(float(np.mean([r["auroc"] for r in v])), 4)}
        for k, v in risk.items()
    }

    rng = np.random.default_rng(0)
    perm = rng.permutation(len(va))
    while (perm == np.arange(len(va))).any():
        perm = rng.permutation(len(va))
    answer: dict[str, list[dict[str, float]]] = {k: [] for k in spaces}
    for seed in [int(s) for s in args.answer_seeds.split(",")]:
        for name, scale in spaces.items():
            z, zd = z_white * scale, (z_default * scale)[va]
            st = SSDStudent(10, 128, 4, seed=seed, device="cpu").fit(x[tr], z[tr], x[va], z[va])
            with torch.no_grad():
                mix = st.predict(x[va])
                own, other = mix.log_prob(zd).numpy(), mix.log_prob(zd[perm]).numpy()
            y = np.r_[np.zeros(len(va)), np.ones(len(va))]
            row = {
                "seed": seed,
                "mismatch_auroc": round(float(auroc(y, -np.r_[own, other])), 4),
            }
            answer[name].append(row)
            print("answer", name, row, flush=True)
    out["answer_head"] = answer

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"risk-targets-{args.workdir.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
