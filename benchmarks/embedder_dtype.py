"""Answer log-likelihoods with a bf16 vs an fp32 answer embedder (bundled student).

    python benchmarks/embedder_dtype.py --n 64      # ~30 s on 2 CPU cores

Scores ``--n`` TriviaQA questions of the shared data with the real SmolLM2 + bundled
student, their reference answers and a mismatched answer each, once with MiniLM in fp32
(what distillation embeds with) and once in bf16 (``SSDScorer.load``'s default), and
reports how much the log-likelihoods move: Spearman correlation, median and max absolute
difference next to the spread of the values, and the one-answer embedding time of each.
Writes ``benchmarks/results/embedder-dtype.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ssd_guard.models import shared_embedder
from ssd_guard.scoring.ssd import SSDScorer
from ssd_guard.training.metrics import spearman

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "triviaqa_3k.jsonl"


def _median_ms(fn: object, repeats: int = 30) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times[1:])), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    rows = []
    with args.data.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == args.n:
                break
    questions = [r["context"] for r in rows]
    answers = [[r["answer"], rows[(i + 1) % len(rows)]["answer"]] for i, r in enumerate(rows)]

    scorer = SSDScorer.load("bundled", embedder_dtype="fp32")
    hidden = scorer.hidden(questions)
    out: dict[str, object] = {"n_questions": len(questions), "answers_per_question": 2}
    lls = {}
    for dtype in ("fp32", "bf16"):
        scorer.embedder.model = shared_embedder(scorer.manifest.embedder.id, dtype=dtype)
        ll = scorer.score_answers(questions, answers, hidden=hidden)
        lls[dtype] = np.array(ll, dtype=float).ravel()
        out[f"embed_one_answer_ms_{dtype}"] = _median_ms(lambda: scorer.embed_answers(["Mars"]))
    diff = np.abs(lls["fp32"] - lls["bf16"])
    out.update(
        {
            "spearman_bf16_vs_fp32": round(spearman(lls["fp32"], lls["bf16"]), 5),
            "median_abs_diff": round(float(np.median(diff)), 4),
            "max_abs_diff": round(float(diff.max()), 4),
            "loglik_std_fp32": round(float(lls["fp32"].std()), 3),
        }
    )
    print(json.dumps(out, indent=2))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "embedder-dtype.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
