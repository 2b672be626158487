"""Which levers make the SSD signals informative? Measured on the VALIDATION split only.

    python benchmarks/ssd_levers.py --workdir runs/smollm2-pooled   # ~15 min on 2 CPU cores

Needs a distillation work directory that has run up to the ``layers`` stage (``ssd-guard
distill --config training/smollm2-pooled.yaml --until layers``). For each variant it fits
the two heads at one grid point and reports, on the validation split (all sources pooled,
and TriviaQA alone):

* risk head: AUROC of the Rényi-2 entropy against "the default answer is wrong", and its
  Spearman correlation with the teacher's dispersion (TD-std, the fidelity);
* answer head: mismatch AUROC (a prompt's own default answer vs another prompt's) for the
  log-likelihood, the pointwise mutual information against an unconditional answer
  density (PMI) and the distance to the mixture mean (consensus), and the AUROC of each
  as a post-generation hallucination score of the default answer.

Variants: the student's input (the probe-selected layer alone; several last-token
layers; plus the question-mean-pooled states), the auxiliary rank term tying entropy to
the teacher's dispersion, and the answer head's variance floor. The test split is never
read. Writes ``benchmarks/results/ssd-levers-<workdir name>.json``; the recipe
``training/smollm2-pooled.yaml`` pins the winners.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.features import FeatureSpec
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.ssd import load_marginal
from ssd_guard.student import SSDStudent
from ssd_guard.training.distill.stages_late import (
    _split_index,
    fit_marginal,
    load_features,
    load_labels,
    load_pca,
    load_pooled,
    teacher_dispersion,
)
from ssd_guard.training.distill.workdir import Workdir, load_prompts
from ssd_guard.training.metrics import auroc, derangement, spearman

ROOT = Path(__file__).resolve().parents[1]


def _answer_signals(
    mix: GaussianMixture, marg: GaussianMixture, z: torch.Tensor
) -> dict[str, np.ndarray]:
    ll = mix.log_prob(z)
    pmi = ll - marg.log_prob(z.unsqueeze(0))[0]
    cons = -(z - mix.mean()).pow(2).sum(-1).sqrt()
    return {"loglik": ll.numpy(), "pmi": pmi.numpy(), "consensus": cons.numpy()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--grid", default="10,256,2", help="K,H,D of both heads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    k, h, d = (int(v) for v in args.grid.split(","))

    wd = Workdir(args.workdir)
    prompts = load_prompts(wd)
    idx = _split_index(wd, prompts)
    tr, va = idx["train"], idx["validation"]
    labels = {r["id"]: bool(r["correct"]) for r in load_labels(wd)}
    wrong_all = np.array([not labels[p["id"]] for p in prompts])
    source = np.array([str(p.get("source", "all")) for p in prompts])
    best = int(wd.read_json("layers.json")["best"])
    hidden = load_features(wd)
    pooled = load_pooled(wd)
    n_layers = hidden.shape[1] - 1
    emb = load_file(str(wd.path("embeddings.safetensors")))
    pca = load_pca(wd)
    td = teacher_dispersion(emb["samples"])
    z_samples = pca.transform(emb["samples"])
    z_default = pca.transform(emb["default"])

    def spread(center: int, n: int, step: int) -> list[int]:
        out = [center + step * (i - n // 2) for i in range(n)]
        return sorted({min(max(1, ly), n_layers) for ly in out})

    quarter = [round(n_layers * f) for f in (0.25, 0.5, 0.75)] + [n_layers - 1]
    variants: dict[str, dict[str, Any]] = {
        "single-best": {"spec": FeatureSpec.single(best)},
        "last-4-around-best": {"spec": FeatureSpec(layers=spread(best, 4, 3))},
        "last-quarters": {"spec": FeatureSpec(layers=sorted(set(quarter)))},
        "last-quarters+pooled-mid": {
            "spec": FeatureSpec(layers=sorted(set(quarter)), pooled_layers=[n_layers // 2])
        },
        "last-quarters+pooled-quarters": {
            "spec": FeatureSpec(layers=sorted(set(quarter)), pooled_layers=sorted(set(quarter)))
        },
    }
    # Training levers on top of the feature variant that the first pass prefers.
    base_extra = {
        "rank1": {"rank_weight": 1.0},
        "floor0.3": {"min_scale_answer": 0.3},
        "floor0.1": {"min_scale_answer": 0.1},
    }
    if pooled is None:
        variants = {n: v for n, v in variants.items() if not v["spec"].pooled_layers}
    only = set(args.only.split(",")) if args.only else None

    va_trivia = va[source[va] == "triviaqa"] if (source == "triviaqa").any() else va
    marg = load_marginal(
        fit_marginal(
            torch.cat([z_samples[tr].reshape(-1, z_samples.shape[-1]), z_default[tr]]),
            16,
            args.seed,
        )
    )
    assert marg is not None
    perm = derangement(len(va), args.seed)

    def run(name: str, spec: FeatureSpec, rank_weight: float, floor: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        x = spec.assemble(hidden, pooled)
        z_r = z_samples[..., :16] * pca.scale[:16]  # risk head: plain PCA coordinates
        risk = SSDStudent(k, h, d, rank_weight=rank_weight, seed=args.seed, device="cpu").fit(
            x[tr], z_r[tr], x[va], z_r[va], dispersion=td[tr], dispersion_val=td[va]
        )
        ans = SSDStudent(k, h, d, min_scale=floor, seed=args.seed, device="cpu").fit(
            x[tr], z_samples[tr], x[va], z_samples[va]
        )
        with torch.no_grad():
            ent = risk.predict(x).renyi2_entropy().numpy()
            mix = ans.predict(x[va])
            own = _answer_signals(mix, marg, z_default[va])
            other = _answer_signals(mix, marg, z_default[va][perm])
        pos = {int(i): n for n, i in enumerate(va)}
        tv = np.array([pos[int(i)] for i in va_trivia])
        out: dict[str, Any] = {
            "features": spec.describe(),
            "in_dim": int(x.shape[1]),
            "rank_weight": rank_weight,
            "min_scale_answer": floor,
            "val": {
                "ssd_auroc": auroc(wrong_all[va], ent[va]),
                "fidelity": spearman(ent[va], td[va].numpy()),
            },
            "val_triviaqa": {
                "ssd_auroc": auroc(wrong_all[va_trivia], ent[va_trivia]),
                "fidelity": spearman(ent[va_trivia], td[va_trivia].numpy()),
            },
            "seconds": 0.0,
        }
        for sig in own:
            y = np.r_[np.zeros(len(va)), np.ones(len(va))]
            out["val"][f"mismatch_{sig}"] = auroc(y, -np.r_[own[sig], other[sig]])
            out["val"][f"post_{sig}"] = auroc(wrong_all[va], -own[sig])
            out["val_triviaqa"][f"post_{sig}"] = auroc(wrong_all[va_trivia], -own[sig][tv])
            yt = np.r_[np.zeros(len(tv)), np.ones(len(tv))]
            out["val_triviaqa"][f"mismatch_{sig}"] = auroc(yt, -np.r_[own[sig][tv], other[sig][tv]])
        out["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(out["val"]), json.dumps(out["val_triviaqa"]), flush=True)
        return out

    results: dict[str, Any] = {}
    for name, v in variants.items():
        if only is None or name in only:
            results[name] = run(name, v["spec"], 0.0, 1e-3)
    # The best feature variant by validation fidelity + AUROC (pooled validation).
    feat_best = max(
        results, key=lambda n: results[n]["val"]["fidelity"] + results[n]["val"]["ssd_auroc"]
    )
    spec_best = variants[feat_best]["spec"]
    for extra, kw in base_extra.items():
        name = f"{feat_best}+{extra}"
        if only is None or name in only or extra in (only or set()):
            results[name] = run(
                name, spec_best, kw.get("rank_weight", 0.0), kw.get("min_scale_answer", 1e-3)
            )
    out = {
        "workdir": str(args.workdir),
        "split": "validation",
        "n_validation": len(va),
        "n_validation_triviaqa": len(va_trivia),
        "probe_layer": best,
        "grid": {"n_components": k, "hidden": h, "depth": d},
        "best_features": feat_best,
        "variants": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"ssd-levers-{args.workdir.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
