"""SemGrad / HybridGrad (arXiv 2605.04638) on TriviaQA: SPS position search, calibration,
and AUROC / AUPRC of "the greedy answer is wrong".

    OMP_NUM_THREADS=1 python benchmarks/gradient_scorers.py --model smollm2 --part all
    OMP_NUM_THREADS=1 python benchmarks/gradient_scorers.py --model gemma3 --part all

Parts (``--part``; ``all`` runs them in order):

* ``sps``: :func:`ssd_guard.scoring.sps.select_position` on ``--n-sps`` train-split
  TriviaQA questions of ``runs/smollm2-pooled`` (paraphrased, rendered in the same
  few-shot format the model sees), positions 1..8 from the prompt end, every layer ->
  ``benchmarks/results/sps-<model>.json``.
* ``score``: the scorer at the SPS position (``-1`` when no SPS file) on the validation
  TriviaQA rows (its values -> the scorer config ``benchmarks/results/semgrad-<model>.json``)
  and on the test TriviaQA rows: AUROC / AUPRC (with bootstrap intervals) of SemGrad,
  HybridGrad, the lm_head gradient and the token statistics against ``correct``;
  SemGrad at every position 1..8 comes free from the same backward pass (``by_position``).
  ``benchmarks/results/gradient-scorers-<model>.json``.

SmolLM2 reads the greedy answers and labels of ``runs/smollm2-pooled`` (labels.jsonl).
Gemma-3-270M has no work directory: its greedy answers (``max_new_tokens`` 16, stop at a
newline, :func:`ssd_guard.generation.sample_answers`) for the first ``--n-val`` validation
and ``--n-test`` test TriviaQA rows of ``runs/smollm2-pooled`` (same few-shot ``text``)
are generated first and judged with :func:`ssd_guard.training.distill.data.is_correct` (alias
containment, as the repo's labels stage). Generations and scores are appended to
``runs/gradient-<model>/`` as they are computed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.scoring.semgrad import ALL_OUTPUTS, SemGradScorer
from ssd_guard.scoring.sps import question_of_prompt, select_position
from ssd_guard.training.metrics import auprc, auroc, bootstrap_ci, bootstrap_indices

ROOT = Path(__file__).resolve().parents[1]
POOLED = ROOT / "runs" / "smollm2-pooled"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}
STUDY_POSITIONS = list(range(-1, -9, -1))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def _pooled_rows(split: str, source: str = "triviaqa") -> list[dict[str, Any]]:
    prompts = {r["id"]: r for r in _jsonl(POOLED / "prompts.jsonl")}
    ids = json.loads((POOLED / "split.json").read_text())[split]
    return [prompts[i] for i in ids if prompts[i]["source"] == source]


def _few_shot_prefix(row: dict[str, Any]) -> str:
    text, prompt = row["text"], row["prompt"]
    if not text.endswith(prompt):
        raise ValueError(f"{row['id']}: text does not end with the prompt")
    return str(text[: -len(prompt)])


def part_sps(lm: Any, model_key: str, n: int) -> dict[str, Any]:
    train = _pooled_rows("train")[:n]
    prefix = _few_shot_prefix(train[0])
    questions = [question_of_prompt(r["prompt"]) for r in train]
    t0 = time.perf_counter()
    res = select_position(
        lm.model,
        lm.tokenizer,
        questions,
        positions=range(1, 9),
        format=lambda q: f"{prefix}Question: {q}\nAnswer:",
    )
    out = {
        "model": lm.model_id,
        "fingerprint": lm.fingerprint,
        "n_questions": len(questions),
        "format": "few-shot prefix of runs/smollm2-pooled + 'Question: {q}\\nAnswer:'",
        "seconds": time.perf_counter() - t0,
        "tokens_at_positions": _tail_tokens(lm.tokenizer, train[0]["text"]),
        **res.as_dict(),
    }
    path = RESULTS / f"sps-{model_key}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"SPS {model_key}: best position {res.best_position}, best layers {res.best_layers}")
    print("  mean SPS per k:", [round(x, 4) for x in res.position_scores])
    return out


def _tail_tokens(tokenizer: Any, text: str) -> list[str]:
    ids = tokenizer(text)["input_ids"][-8:]
    return [tokenizer.decode([i]) for i in ids][::-1]  # k = 1, 2, ...


def _labelled(lm: Any, model_key: str, split: str, n: int, work: Path) -> list[dict[str, Any]]:
    """``{id, text, default, correct}`` rows of the split's first ``n`` TriviaQA rows."""
    rows = _pooled_rows(split)[:n]
    if model_key == "smollm2":
        labels = {r["id"]: r for r in _jsonl(POOLED / "labels.jsonl")}
        return [
            {
                "id": r["id"],
                "text": r["text"],
                "default": labels[r["id"]]["default"],
                "correct": bool(labels[r["id"]]["correct"]),
            }
            for r in rows
        ]
    from ssd_guard.generation import sample_answers
    from ssd_guard.training.distill.data import is_correct

    path = work / f"generations-{split}.jsonl"
    done = {r["id"]: r for r in _jsonl(path)}
    todo = [r for r in rows if r["id"] not in done]
    t0 = time.perf_counter()
    for s in range(0, len(todo), 16):
        batch = todo[s : s + 16]
        res = sample_answers(
            lm.model,
            lm.tokenizer,
            [r["text"] for r in batch],
            n_samples=0,
            max_new_tokens=16,
            return_hidden=False,
        )
        new = [
            {
                "id": r["id"],
                "text": r["text"],
                "default": d,
                "correct": bool(is_correct(d, r["aliases"], containment=True)),
            }
            for r, d in zip(batch, res.default)
        ]
        _append(path, new)
        done.update({x["id"]: x for x in new})
        print(f"  generated {split} {len(done)}/{len(rows)} ({time.perf_counter() - t0:.0f}s)")
    return [done[r["id"]] for r in rows]


def _scores(
    scorer: SemGradScorer, rows: list[dict[str, Any]], path: Path, chunk: int = 32
) -> tuple[dict[str, np.ndarray], float]:
    """Every output for ``rows`` (resumable cache at ``path``) and ms per prompt of the
    rows scored in this run (NaN when all were cached)."""
    cache = {r["id"]: r for r in _jsonl(path) if r.get("position") == scorer.position}
    todo = [r for r in rows if r["id"] not in cache]
    t0, n_done = time.perf_counter(), 0
    for s in range(0, len(todo), chunk):
        batch = todo[s : s + chunk]
        res = scorer.score_pairs_all(
            [r["text"] for r in batch],
            [r["default"] for r in batch],
            formatted=True,
            positions=STUDY_POSITIONS,
        )
        new = [
            {
                "id": r["id"],
                "position": scorer.position,
                **{k: (None if not np.isfinite(v[j]) else float(v[j])) for k, v in res.items()},
            }
            for j, r in enumerate(batch)
        ]
        _append(path, new)
        cache.update({x["id"]: x for x in new})
        n_done += len(batch)
        print(f"  scored {len(cache)}/{len(rows)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    timing = path.with_name(path.stem + "-timing.json")
    if n_done:
        ms = 1000 * (time.perf_counter() - t0) / n_done
        timing.write_text(json.dumps({"ms_per_prompt": ms, "n": n_done}) + "\n")
    else:  # all cached: the timing of the run that scored them
        ms = json.loads(timing.read_text())["ms_per_prompt"] if timing.exists() else float("nan")
    keys = [*ALL_OUTPUTS, *(f"semgrad@{p}" for p in STUDY_POSITIONS)]
    out = {
        k: np.array([np.nan if cache[r["id"]][k] is None else cache[r["id"]][k] for r in rows])
        for k in keys
    }
    return out, ms


def _metrics(wrong: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    """AUROC / AUPRC with 1000 seeded bootstrap resamples of the scored (finite) rows."""
    ok = np.isfinite(s)
    y, v = wrong[ok], s[ok]
    idx = bootstrap_indices(int(ok.sum()), 1000, 0)
    return {
        "auroc": bootstrap_ci(auroc, y, v, indices=idx).as_dict(),
        "auprc": bootstrap_ci(auprc, y, v, indices=idx).as_dict(),
        "n": int(ok.sum()),
    }


def part_score(lm: Any, model_key: str, n_val: int, n_test: int, batch_size: int) -> dict[str, Any]:
    work = ROOT / "runs" / f"gradient-{model_key}"
    sps_path = RESULTS / f"sps-{model_key}.json"
    sps = json.loads(sps_path.read_text()) if sps_path.exists() else None
    position = int(sps["best_position"]) if sps else -1
    scorer = SemGradScorer(
        lm.model, lm.tokenizer, position=position, batch_size=batch_size, model_id=lm.model_id
    )
    if sps:
        scorer.sps = {
            k: sps[k]
            for k in ("best_position", "best_layers", "positions", "position_scores", "n_questions")
        }
    val = _labelled(lm, model_key, "validation", n_val, work)
    test = _labelled(lm, model_key, "test", n_test, work)
    val_s, val_ms = _scores(scorer, val, work / "scores-validation.jsonl")
    for k in ("semgrad", "hybridgrad"):
        v = val_s[k][np.isfinite(val_s[k])]
        scorer.calibration[k] = sorted(float(x) for x in v)
    config = scorer.save_config(RESULTS / f"semgrad-{model_key}.json")
    test_s, test_ms = _scores(scorer, test, work / "scores-test.jsonl")
    wrong = np.array([not r["correct"] for r in test])
    risks = {
        "semgrad": test_s["semgrad"],
        "hybridgrad": test_s["hybridgrad"],
        "lm_head_grad": test_s["lm_head_grad"],
        "neg_tok_lp_mean": -test_s["tok_lp_mean"],
        "neg_tok_lp_min": -test_s["tok_lp_min"],
        "tok_entropy_mean": test_s["tok_entropy_mean"],
    }
    by_position = {}
    for p in STUDY_POSITIONS:
        sem = test_s[f"semgrad@{p}"]
        a = test_s["alpha"]
        hyb = a * test_s["lm_head_grad"] + (1 - a) * sem
        by_position[str(p)] = {
            "semgrad": _metrics(wrong, sem)["auroc"]["value"],
            "hybridgrad": _metrics(wrong, hyb)["auroc"]["value"],
        }
    out = {
        "model": lm.model_id,
        "fingerprint": lm.fingerprint,
        "dtype": str(next(lm.model.parameters()).dtype),
        "position": position,
        "layers": scorer.layers,
        "sps_best_layers": sps["best_layers"] if sps else None,
        "config": str(config.relative_to(ROOT)),
        "n_validation": len(val),
        "n_test": len(test),
        "validation_accuracy": float(np.mean([r["correct"] for r in val])),
        "test_accuracy": float(np.mean([r["correct"] for r in test])),
        "empty_answers_test": int(np.sum(~np.isfinite(test_s["semgrad"]))),
        "ms_per_prompt": {"validation": val_ms, "test": test_ms},
        "threads": torch.get_num_threads(),
        "target": "wrong (not correct), higher score = riskier",
        "test": {k: _metrics(wrong, v) for k, v in risks.items()},
        "by_position_test_auroc": by_position,
        "answers": "greedy (labels.jsonl default)"
        if model_key == "smollm2"
        else "greedy, generated here (runs/gradient-gemma3/generations-*.jsonl)",
    }
    path = RESULTS / f"gradient-scorers-{model_key}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for k, m in out["test"].items():
        print(f"  {k:18s} AUROC {m['auroc']['value']:.3f}  AUPRC {m['auprc']['value']:.3f}")
    print(f"  ms/prompt {test_ms:.0f}; wrote {path}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--part", choices=["sps", "score", "all"], default="all")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--n-sps", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from ssd_guard.models import load_causal_lm

    lm = load_causal_lm(MODELS[args.model], dtype=args.dtype)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part in ("sps", "all"):
        part_sps(lm, args.model, args.n_sps)
    if args.part in ("score", "all"):
        part_score(lm, args.model, args.n_val, args.n_test, args.batch_size)


if __name__ == "__main__":
    main()
