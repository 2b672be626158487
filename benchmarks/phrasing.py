"""Does an answer's score follow its content, not its form?

    python benchmarks/phrasing.py [--artifact bundled] [--n 150]   # ~1 min on 2 CPU cores

Builds (question, correct answer, the same answer as a sentence, a plausible wrong
answer, an absurd answer) cases from the TriviaQA test split of the shared data (the
split of ``training/smollm2-triviaqa.yaml``: seed 0, 70/10/20), which no student was
trained on:

* correct: the data set's gold answer;
* sentence: the gold answer inside a sentence, by one of several templates (some restate
  the question, e.g. "The answer to 'Who wrote Hamlet?' is William Shakespeare.");
* plausible wrong: the gold answer of the *most similar other* test question (MiniLM
  cosine of the questions), i.e. an answer of the right kind for a neighbouring topic;
* absurd: an answer of the wrong kind entirely ("A banana", "Purple", ...).

For every answer signal of the student (``loglik``, ``pmi``, ``consensus``) it reports
how often correct > absurd, sentence > absurd, correct > plausible wrong, and the median
|short - sentence| gap against the median correct - absurd gap. Writes
``benchmarks/results/phrasing-<artifact name>.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ssd_guard.training.distill.data import load_qa_jsonl, split_ids

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "triviaqa_3k.jsonl"

TEMPLATES = (
    "The answer is {a}.",
    "I believe it is {a}.",
    "{a} is the answer.",
    "The answer to '{q}' is {a}.",
    "As far as I know, {a}.",
    "It's {a}, if I remember correctly.",
)
#: The cases users reported (docs/results/index.md "Answers in any form" quotes their scores).
ISSUE_EXAMPLES = (
    ("What is the capital of France?", ("Paris", "Berlin", "A banana")),
    (
        "Who wrote Hamlet?",
        (
            "William Shakespeare",
            "Shakespeare",
            "Hamlet was written by William Shakespeare.",
            "A banana",
        ),
    ),
    ("What is the capital of Japan?", ("Tokyo", "A banana")),
)
ABSURD = (
    "A banana",
    "Purple",
    "Seventeen kilograms of cheese",
    "Tuesday afternoon",
    "A small rubber duck",
    "The colour of the wind",
    "Moist socks",
    "Singing loudly in the shower",
)


def build_cases(n: int, seed: int, embedder: Any, split_name: str = "test") -> list[dict[str, str]]:
    rows = load_qa_jsonl(DATA)
    split = split_ids([r.id for r in rows], (0.7, 0.1, 0.2), 0)
    test = [r for r in rows if r.id in set(split[split_name])]
    rng = random.Random(seed)
    rng.shuffle(test)
    test = test[: max(n, 2)]
    questions = [r.question for r in test]
    emb = np.asarray(embedder.encode(questions, normalize_embeddings=True))
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    cases = []
    for i, r in enumerate(test):
        j = int(np.argmax(sim[i]))
        wrong = test[j].answer
        if wrong.lower() in {a.lower() for a in r.aliases}:
            continue
        tmpl = TEMPLATES[i % len(TEMPLATES)]
        cases.append(
            {
                "id": r.id,
                "question": r.question,
                "correct": r.answer,
                "sentence": tmpl.format(a=r.answer, q=r.question),
                "plausible_wrong": wrong,
                "absurd": ABSURD[rng.randrange(len(ABSURD))],
            }
        )
    return cases[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    from ssd_guard.scoring.ssd import SSDScorer

    t0 = time.perf_counter()
    ssd = SSDScorer.load(args.artifact)
    cases = build_cases(args.n, args.seed, ssd.embedder.model)
    kinds = ("correct", "sentence", "plausible_wrong", "absurd")
    prompts = [c["question"] for c in cases]
    answers = [[c[k] for k in kinds] for c in cases]
    sig = ssd.answer_signals(prompts, answers)
    out: dict[str, Any] = {
        "artifact": str(args.artifact),
        "student_fingerprint": ssd.fingerprint,
        "data": "TriviaQA test split (seed 0, 70/10/20), never trained on",
        "n_cases": len(cases),
        "templates": list(TEMPLATES),
        "signals": {},
        "examples": cases[:5],
    }
    for name, table in sig.items():
        s = np.asarray(table, dtype=np.float64)  # [N, 4]
        c, sent, wrong, absurd = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        out["signals"][name] = {
            "correct_gt_absurd": float(np.mean(c > absurd)),
            "sentence_gt_absurd": float(np.mean(sent > absurd)),
            "correct_gt_plausible_wrong": float(np.mean(c > wrong)),
            "median_abs_gap_short_vs_sentence": float(np.median(np.abs(c - sent))),
            "median_gap_correct_minus_absurd": float(np.median(c - absurd)),
            "median_gap_correct_minus_wrong": float(np.median(c - wrong)),
        }
        print(name, json.dumps(out["signals"][name]))
    for i, c in enumerate(out["examples"]):
        c["scores"] = {k: dict(zip(kinds, sig[k][i], strict=True)) for k in sig}
    issue = ssd.answer_signals([q for q, _ in ISSUE_EXAMPLES], [list(a) for _, a in ISSUE_EXAMPLES])
    out["issue_examples"] = {
        q: {k: dict(zip(answers, issue[k][i], strict=True)) for k in issue}
        for i, (q, answers) in enumerate(ISSUE_EXAMPLES)
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(str(args.artifact)).name if args.artifact != "bundled" else "bundled"
    path = args.out_dir / f"phrasing-{name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
