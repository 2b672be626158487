"""The shipped policies' operating point: coverage and error among kept answers.

    python benchmarks/operating_point.py --workdir runs/smollm2-pooled --source triviaqa

For the bundled student on a source's TEST split (never trained on) it applies every
threshold the shipped policies use (``policies/*.yaml``: quantiles of the student's
calibration values) and a sweep of quantiles, and reports for each: the share of prompts
the guard lets through (coverage), the error rate among the default answers it lets
through, and the error rate of the answers it stops. The results page's policy table and the
thresholds in ``policies/default.yaml`` come from this file:
``benchmarks/results/operating-point-smollm2-<source>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ssd_guard.training.metrics import derangement
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import load_workdir

ROOT = Path(__file__).resolve().parents[1]


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=np.float64), q))


def _point(keep: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    n_keep = int(keep.sum())
    return {
        "coverage": float(keep.mean()),
        "n_kept": n_keep,
        "error_among_kept": float(wrong[keep].mean()) if n_keep else None,
        "error_among_stopped": float(wrong[~keep].mean()) if (~keep).any() else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--source", default="triviaqa")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    from ssd_guard.scoring.ssd import SSDScorer

    ssd = SSDScorer.load(args.artifact, embedder_dtype="fp32")
    data = load_workdir(args.workdir)
    rows = np.array(
        [i for i in data.split["test"] if str(data.prompts[i].get("source")) == args.source]
    )
    stats = data.stats.subset(rows)
    wrong = ~data.correct[rows]
    sc = SSDStatsScorer(ssd)
    ent = np.asarray(sc.score(stats))
    assert stats.default_embeddings is not None
    signals = sc.answer_signals(stats, stats.default_embeddings)
    cal = ssd.calibration
    out: dict[str, Any] = {
        "artifact": str(args.artifact),
        "student_fingerprint": ssd.fingerprint,
        "source": args.source,
        "split": "test",
        "n_test": len(rows),
        "error_rate_all": float(wrong.mean()),
        "prompt_rules": {},
        "answer_rules": {},
        "combined": {},
    }
    for q in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
        thr = _quantile(cal["entropy"], q)
        out["prompt_rules"][f"entropy gt_quantile {q}"] = {
            "threshold": thr,
            **_point(ent <= thr, wrong),
        }
    # A foreign answer: another test prompt's default answer (a seeded derangement), the
    # mismatch case the answer rule is for.
    perm = derangement(len(rows), 0)
    foreign = sc.answer_signals(stats, stats.default_embeddings[perm])
    for sig in ("pmi", "loglik"):
        for q in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
            thr = _quantile(cal[sig], q)
            out["answer_rules"][f"{sig} lt_quantile {q}"] = {
                "threshold": thr,
                **_point(signals[sig] >= thr, wrong),
                "foreign_answers_rejected": float(np.mean(foreign[sig] < thr)),
            }
    for qe, qa in ((0.9, 0.05), (0.7, 0.05), (0.5, 0.05), (0.7, 0.2)):
        keep = (ent <= _quantile(cal["entropy"], qe)) & (
            signals["pmi"] >= _quantile(cal["pmi"], qa)
        )
        out["combined"][f"entropy gt_quantile {qe} + pmi lt_quantile {qa}"] = _point(keep, wrong)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"operating-point-smollm2-{args.source}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    for section in ("prompt_rules", "answer_rules", "combined"):
        for k, v in out[section].items():
            extra = v.get("foreign_answers_rejected")
            tail = "" if extra is None else f"  foreign rejected {extra:.3f}"
            err = v["error_among_kept"]
            print(f"{k:<46} coverage {v['coverage']:.3f}  error kept {err:.3f}{tail}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
