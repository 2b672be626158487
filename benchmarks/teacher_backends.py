"""Teacher throughput by backend, in one run on this machine: one process vs Ray Data.

Samples the same prompts (TriviaQA, K = 10 at T = 1 plus the greedy answer, 16 new
tokens, SmolLM2-135M-Instruct) with ``teacher.backend: hf`` (one process, ``--threads``
CPU threads) and ``teacher.backend: ray`` (``--workers`` actors, one thread each, a local
Ray), in fresh work dirs, and writes prompts per second, the ratio and whether the two
gave the same answers to ``benchmarks/results/teacher-backends-smollm2.json``.

    python benchmarks/teacher_backends.py --prompts 64      # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd_guard.training.distill import pipeline  # noqa: E402
from ssd_guard.training.distill.recipe import Recipe  # noqa: E402
from ssd_guard.training.distill.workdir import Workdir, load_teacher_all  # noqa: E402


def recipe(workdir: Path, data: Path, n: int, threads: int, **teacher: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "teacher-backends",
            "base_model": "smollm2-135m-instruct",
            "dtype": "auto",
            "threads": threads,
            "workdir": str(workdir),
            "data": {"path": str(data), "limit": n, "split": [0.8, 0.1, 0.1]},
            "prompt": {"few_shot": "Question: What is the capital of France?\nAnswer: Paris\n\n"},
            "teacher": {"n_samples": 10, "max_new_tokens": 16, "batch_size": 8, **teacher},
        }
    )


def timed(r: Recipe) -> tuple[float, list[dict[str, Any]]]:
    pipeline.run_pipeline(r, progress=False, until="prompts")
    t0 = time.perf_counter()
    pipeline.run_pipeline(r, progress=False, until="teacher")
    seconds = time.perf_counter() - t0
    records, _, _ = load_teacher_all(Workdir(Path(r.workdir)))
    return seconds, records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the one process")
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "triviaqa_3k.jsonl"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "teacher-backends-smollm2.json",
    )
    args = ap.parse_args(argv)
    if not args.data.exists():
        args.data = ROOT / "tests" / "data" / "triviaqa_40.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        hf_s, hf_records = timed(
            recipe(
                Path(tmp, "hf"), args.data, args.prompts, args.threads, shard_size=args.shard_size
            )
        )
        ray_s, ray_records = timed(
            recipe(
                Path(tmp, "ray"),
                args.data,
                args.prompts,
                args.threads,
                shard_size=args.shard_size,
                backend="ray",
                workers=args.workers,
                threads_per_worker=1,
            )
        )
    n = len(hf_records)
    result = {
        "meta": {
            "command": "python benchmarks/teacher_backends.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
            "model": "SmolLM2-135M-Instruct",
            "data": str(args.data.name),
            "teacher": "K=10 at T=1 + greedy default, 16 new tokens, batch 8",
        },
        "prompts": n,
        "hf": {"threads": args.threads, "seconds": hf_s, "prompts_per_s": n / hf_s},
        "ray": {
            "workers": args.workers,
            "threads_per_worker": 1,
            "seconds": ray_s,
            "prompts_per_s": n / ray_s,
            "includes": "starting a local Ray and loading the model in each actor",
        },
        "ray_over_hf": (n / ray_s) / (n / hf_s),
        "same_answers": hf_records == ray_records,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        json.dumps({k: result[k] for k in ("hf", "ray", "ray_over_hf", "same_answers")}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
