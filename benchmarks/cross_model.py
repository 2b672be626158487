"""Cross-model students: guarding an API-only model with a local proxy's hidden states.

Gemma-3-270M plays the API model: it is served on 127.0.0.1 by
``ssd_guard.integrations.openai_server`` and reached through the real ``openai`` /
``langchain-openai`` client (``teacher.backend: chat``). On the same questions (TriviaQA
and StrategyQA pooled, 602 training questions) and Gemma's own answers and correctness
labels, three students are compared on the test split:

* ``native``: a Gemma student reading Gemma's own hidden states
  (``training/xmodel-gemma3-native.yaml``);
* ``proxy_student``: a SmolLM2-proxy student trained on Gemma's samples
  (``training/xmodel-smollm2-proxy.yaml``): SmolLM2's states, Gemma's answers;
* ``proxy_bundled``: today's approach, the bundled SmolLM2 student (trained on SmolLM2's
  own answers) read as a proxy.

For each: ``auroc`` (the prompt's entropy against "Gemma's default answer is wrong") and
``mismatch_auroc`` (the student's answer signal of Gemma's own default answer against the
default answer of another test question), each with a bootstrap 95 % interval, and
``n_test``. The two recipes share one answer cache (runs/xmodel/gemma3-answers.jsonl), so
Gemma is sampled once; every stage resumes after a kill.

    python benchmarks/cross_model.py      # ~1 h on 2 CPU cores, most of it Gemma sampling
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd_guard.answers import question_of  # noqa: E402
from ssd_guard.evaluation.common import _interval, _mismatch_auroc  # noqa: E402
from ssd_guard.integrations.openai_server import ChatServer  # noqa: E402
from ssd_guard.models import load_causal_lm  # noqa: E402
from ssd_guard.scoring.ssd import SSDScorer  # noqa: E402
from ssd_guard.training import metrics as M  # noqa: E402
from ssd_guard.training.distill.pipeline import run_pipeline  # noqa: E402
from ssd_guard.training.distill.recipe import Recipe, load_recipe  # noqa: E402
from ssd_guard.training.workdir_data import load_workdir  # noqa: E402

RECIPES = {
    "native": ROOT / "training" / "xmodel-gemma3-native.yaml",
    "proxy_student": ROOT / "training" / "xmodel-smollm2-proxy.yaml",
}
OUT = ROOT / "benchmarks" / "results" / "cross-model-gemma3.json"


def _with_server(recipe: Recipe, url: str) -> Recipe:
    assert recipe.teacher.chat is not None
    chat = recipe.teacher.chat.model_copy(
        update={"options": {**recipe.teacher.chat.options, "base_url": url}}
    )
    return recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"chat": chat})})


def _smoke(r: Recipe) -> Recipe:
    """*r* on 40 + 30 questions, in its own work dir and answer cache."""
    assert r.data.sources is not None and r.teacher.chat is not None
    sources = [
        s.model_copy(update={"limit": 40 if i == 0 else 30}) for i, s in enumerate(r.data.sources)
    ]
    cache = str(r.teacher.chat.options["cache"]).replace(".jsonl", "-smoke.jsonl")
    chat = r.teacher.chat.model_copy(update={"options": {**r.teacher.chat.options, "cache": cache}})
    return r.model_copy(
        update={
            "workdir": r.workdir.replace("runs/xmodel-", "runs/xmodel-smoke-"),
            "data": r.data.model_copy(update={"sources": sources}),
            "teacher": r.teacher.model_copy(update={"chat": chat, "n_samples": 4}),
        }
    )


def _scores(
    scorer: SSDScorer, texts: list[str], answers: list[str], other: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entropy of each prompt, the answer signal of its own answer and of another's."""
    entropy = np.asarray(scorer.score_prompts(texts, formatted=True), dtype=float)
    own = np.asarray(
        [s[0] for s in scorer.score_answers(texts, [[a] for a in answers], formatted=True)]
    )
    foreign = [[answers[j]] for j in other]
    oth = np.asarray([s[0] for s in scorer.score_answers(texts, foreign, formatted=True)])
    return entropy, own, oth


def _row(
    wrong: np.ndarray, entropy: np.ndarray, own: np.ndarray, oth: np.ndarray, idx: np.ndarray
) -> dict[str, Any]:
    return {
        "auroc": M.auroc(wrong, entropy),
        "auroc_ci": _interval(M.auroc, wrong, entropy, idx=idx),
        "mismatch_auroc": _mismatch_auroc(own, oth),
        "mismatch_auroc_ci": _interval(_mismatch_auroc, own, oth, idx=idx),
        "n_test": int(wrong.shape[0]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--port", type=int, default=18473, help="the API model's loopback port")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a few questions per source, in runs/xmodel-smoke-* (checks the whole path)",
    )
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    recipes = {k: load_recipe(p) for k, p in RECIPES.items()}
    if args.smoke:
        recipes = {k: _smoke(r) for k, r in recipes.items()}
    few_shot = recipes["proxy_student"].prompt.few_shot
    gemma = load_causal_lm("gemma3-270m", dtype="auto")
    server = ChatServer(
        gemma, "gemma-3-270m", port=args.port, template=few_shot + "Question: {question}\nAnswer:"
    )
    url = server.start()
    print(f"API model (Gemma-3-270M) at {url}", file=sys.stderr, flush=True)
    workdirs: dict[str, Path] = {}
    try:
        for name in ("proxy_student", "native"):  # the proxy run samples Gemma; native reuses
            t0 = time.perf_counter()
            workdirs[name] = run_pipeline(_with_server(recipes[name], url), progress=True)
            timings[f"distill_{name}_s"] = round(time.perf_counter() - t0, 1)
            print(f"[{name}] distilled in {timings[f'distill_{name}_s']} s", file=sys.stderr)
    finally:
        server.stop()
    requests = server.requests

    data = load_workdir(workdirs["proxy_student"])
    rows = data.split_rows("test")
    wrong = ~data.split_correct("test").astype(bool)
    answers = list(data.split_stats("test").default)
    questions = [question_of(str(r["prompt"])) for r in rows]
    other = M.derangement(len(rows), 0)
    idx = M.bootstrap_indices(len(rows), args.n_boot, 0)
    native_data = load_workdir(workdirs["native"])
    assert list(native_data.split_stats("test").default) == answers, "the two runs' answers differ"

    results: dict[str, Any] = {}
    for name, artifact, lm in (
        ("native", workdirs["native"] / "artifact", gemma),
        ("proxy_student", workdirs["proxy_student"] / "artifact", None),
        ("proxy_bundled", "bundled", None),
    ):
        scorer = SSDScorer.load(artifact, lm=lm) if lm is not None else SSDScorer.load(artifact)
        texts = [scorer.format_prompt(r["prompt"]) for r in rows]
        t0 = time.perf_counter()
        results[name] = _row(wrong, *_scores(scorer, texts, answers, other), idx)
        results[name]["artifact"] = str(artifact)
        results[name]["hidden_states_of"] = scorer.model_id
        results[name]["score_seconds"] = round(time.perf_counter() - t0, 2)
        print(name, {k: results[name][k] for k in ("auroc", "mismatch_auroc")}, file=sys.stderr)

    b, c, a = (results[k]["auroc"] for k in ("proxy_student", "proxy_bundled", "native"))
    out = {
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "api_model": "gemma-3-270m (google/gemma-3-270m, bundled GGUF), served on loopback",
        "proxy_model": "smollm2-135m-instruct",
        "client": "langchain-openai ChatOpenAI -> ssd_guard.integrations.openai_server",
        "positive": "Gemma's default (greedy) answer is wrong",
        "positive_rate": float(wrong.mean()),
        "sources": sorted({str(r.get("source")) for r in rows}),
        "questions": {k: len(v) for k, v in data.split.items()},
        "example_test_questions": questions[:3],
        **results,
        "targets": {
            "proxy_student_minus_bundled": round(b - c, 4),
            "proxy_student_ge_bundled_plus_0.05": bool(b >= c + 0.05),
            "native_minus_proxy_student": round(a - b, 4),
            "proxy_student_within_0.05_of_native": bool(a - b <= 0.05),
        },
        "api_requests": requests,
        "timings": timings | {"total_s": round(time.perf_counter() - t_start, 1)},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "command": "python benchmarks/cross_model.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
