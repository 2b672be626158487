"""How much to floor the unconditional answer density behind ``pmi``? VALIDATION only.

    python benchmarks/marginal_floor.py --workdir runs/smollm2-pooled   # ~2 min on 2 CPU cores

An answer the base model gives to many questions (e.g. a few-shot example it copies, like
"William Shakespeare") gets a needle-thin component in the unconditional density, so its
PMI plunges even where it is right. For several floors on the density's standard
deviations this refits the density on the work directory's training answers (as the
``student`` stage does) and reports, with the bundled student's heads: the validation
mismatch AUROC of ``pmi`` (own default answer vs another prompt's) and the phrasing
checks of ``benchmarks/phrasing.py`` on TriviaQA *validation* questions. Writes
``benchmarks/results/marginal-floor-validation.json``; the recipe's
``student.marginal_min_scale`` is the chosen floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.scoring.ssd import load_marginal
from ssd_guard.training.distill.stages_late import _split_index, fit_marginal, load_pca
from ssd_guard.training.distill.workdir import Workdir, load_prompts
from ssd_guard.training.metrics import auroc, derangement
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import load_workdir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from phrasing import build_cases

    from ssd_guard.scoring.ssd import SSDScorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--floors", default="0,0.3,0.5,1.0")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/marginal-floor-validation.json"
    )
    args = ap.parse_args()

    ssd = SSDScorer.load(args.artifact, embedder_dtype="fp32")
    wd = Workdir(args.workdir)
    idx = _split_index(wd, load_prompts(wd))
    emb = load_file(str(wd.path("embeddings.safetensors")))
    pca = load_pca(wd)
    d = int(ssd.heads["answer"].dim_)
    z_s, z_d = pca.transform(emb["samples"])[..., :d], pca.transform(emb["default"])[:, :d]
    tr = idx["train"]
    z_tr = torch.cat([z_s[tr].reshape(-1, d), z_d[tr]])
    data = load_workdir(args.workdir)
    va = data.split["validation"]
    stats = data.stats.subset(va)
    assert stats.default_embeddings is not None
    sc = SSDStatsScorer(ssd)
    perm = derangement(len(va), 0)
    y = np.r_[np.zeros(len(va)), np.ones(len(va))]
    cases = build_cases(150, 0, ssd.embedder.model, "validation")
    kinds = ("correct", "sentence", "plausible_wrong", "absurd")
    out: dict[str, dict[str, float]] = {}
    for floor in (float(f) for f in args.floors.split(",")):
        ssd.marginal = load_marginal(fit_marginal(z_tr, 16, 0, floor))
        own = sc.answer_signals(stats, stats.default_embeddings)["pmi"]
        other = sc.answer_signals(stats, stats.default_embeddings[perm])["pmi"]
        a = np.asarray(
            ssd.answer_signals(
                [c["question"] for c in cases], [[c[k] for k in kinds] for c in cases]
            )["pmi"]
        )
        out[str(floor)] = {
            "val_mismatch_pmi": auroc(y, -np.r_[own, other]),
            "correct_gt_absurd": float((a[:, 0] > a[:, 3]).mean()),
            "sentence_gt_absurd": float((a[:, 1] > a[:, 3]).mean()),
            "correct_gt_plausible_wrong": float((a[:, 0] > a[:, 2]).mean()),
        }
        print(floor, json.dumps(out[str(floor)]), flush=True)
    result = {"split": "validation", "n_cases": len(cases), "marginal_scale_floor": out}
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
