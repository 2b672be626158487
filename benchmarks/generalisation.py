"""Does the student carry over to other kinds of question? Per-source test results.

    python benchmarks/generalisation.py --workdir runs/smollm2-pooled \\
        --student pooled=runs/smollm2-pooled/artifact \\
        --student triviaqa-only=runs/smollm2-pooled/artifact-triviaqa-only   # ~1 min

For each source of a pooled work directory (TriviaQA, CommonsenseQA, Social IQa,
StrategyQA, ARC-Easy; the choice sets asked as open questions) and each student, on that
source's TEST split (never trained on): the AUROC of the SSD entropy against "the default
answer is wrong", its Spearman correlation with the teacher's dispersion (fidelity), the
AUROC of TD-std for reference, and the mismatch AUROC (own default answer vs another
prompt's) of every answer signal. Writes ``benchmarks/results/generalisation-smollm2.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.evaluation.baselines.dispersion import dispersion
from ssd_guard.training.metrics import auroc, derangement, spearman
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import load_workdir

ROOT = Path(__file__).resolve().parents[1]


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    value = auroc(y, s)
    return None if math.isnan(value) else value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--student", action="append", required=True, help="NAME=ARTIFACT_DIR")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/generalisation-smollm2.json"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from ssd_guard.scoring.ssd import SSDScorer

    data = load_workdir(args.workdir)
    sources = sorted({str(p.get("source")) for p in data.prompts})
    students = dict(s.split("=", 1) for s in args.student)
    out: dict[str, Any] = {"workdir": str(args.workdir), "split": "test", "sources": {}}
    scorers = {}
    for name, path in students.items():
        # The base model and embedder are loaded once per process and shared.
        ssd = SSDScorer.load(path, embedder_dtype="fp32")
        scorers[name] = (ssd, SSDStatsScorer(ssd, name=name))
        out.setdefault("students", {})[name] = {
            "artifact": path,
            "fingerprint": ssd.fingerprint,
            "trained_on": ssd.manifest.training.get("trained_on_sources"),
            "features": ssd.features.describe(),
        }
    test_idx = data.split["test"]
    for src in sources:
        rows = np.array([i for i in test_idx if str(data.prompts[i].get("source")) == src])
        stats = data.stats.subset(rows)
        wrong = ~data.correct[rows]
        assert stats.sample_embeddings is not None and stats.default_embeddings is not None
        td = dispersion(stats.sample_embeddings, "std")
        entry: dict[str, Any] = {
            "n_test": len(rows),
            "greedy_accuracy": float(1 - wrong.mean()),
            "TD-std_auroc": _auroc(wrong, td),
            "students": {},
        }
        perm = derangement(len(rows), args.seed)
        for name, (_ssd, sc) in scorers.items():
            with torch.no_grad():
                ent = sc.score(stats)
            own = sc.answer_signals(stats, stats.default_embeddings)
            other = sc.answer_signals(stats, stats.default_embeddings[perm])
            y = np.r_[np.zeros(len(rows)), np.ones(len(rows))]
            entry["students"][name] = {
                "ssd_auroc": _auroc(wrong, ent),
                "fidelity": spearman(ent, td),
                "mismatch_auroc": {k: _auroc(y, -np.r_[own[k], other[k]]) for k in own},
                "post_generation_auroc": {k: _auroc(wrong, -own[k]) for k in own},
            }
        out["sources"][src] = entry
        print(src, json.dumps(entry))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
