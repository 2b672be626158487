"""Teacher throughput by backend, in one run on this machine: one process vs Ray Data.

Samples the same prompts (TriviaQA, K = 10 at T = 1 plus the greedy answer, 16 new
tokens, SmolLM2-135M-Instruct) in fresh work dirs with

- ``teacher.backend: hf``, one process with one CPU thread (the same thread count as each
  Ray actor, so the float reductions and hence the sampled tokens are the same),
- ``teacher.backend: hf``, one process with ``--threads`` CPU threads (all the cores: the
  fair throughput baseline),
- ``teacher.backend: ray``, ``--workers`` actors with one thread each on a local Ray,

and writes prompts per second, the two ratios, whether the one-thread process and Ray gave
the same answers, and the largest hidden-state difference to
``benchmarks/results/teacher-backends-smollm2.json``. Run it on an otherwise idle machine.

    python benchmarks/teacher_backends.py --prompts 48      # ~6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

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


def timed(r: Recipe) -> tuple[float, list[dict[str, Any]], torch.Tensor]:
    pipeline.run_pipeline(r, progress=False, until="prompts")
    t0 = time.perf_counter()
    pipeline.run_pipeline(r, progress=False, until="teacher")
    seconds = time.perf_counter() - t0
    records, hidden, _ = load_teacher_all(Workdir(Path(r.workdir)))
    return seconds, records, hidden


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
    load_at_start = os.getloadavg()[0]
    if not args.data.exists():
        args.data = ROOT / "tests" / "data" / "triviaqa_40.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, tuple[float, list[dict[str, Any]], torch.Tensor]] = {}
        for name, threads, teacher in (
            ("hf_1_thread", 1, {}),
            ("hf", args.threads, {}),
            (
                "ray",
                1,
                {"backend": "ray", "workers": args.workers, "threads_per_worker": 1},
            ),
        ):
            runs[name] = timed(
                recipe(
                    Path(tmp, name),
                    args.data,
                    args.prompts,
                    threads,
                    shard_size=args.shard_size,
                    **teacher,
                )
            )
            print(f"{name}: {runs[name][0]:.1f} s", flush=True)
    n = len(runs["hf"][1])

    def rate(name: str) -> float:
        return n / runs[name][0]

    h1, hr = runs["hf_1_thread"][2].float(), runs["ray"][2].float()
    result = {
        "meta": {
            "command": "python benchmarks/teacher_backends.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average_at_start": load_at_start,
            },
            "model": "SmolLM2-135M-Instruct",
            "data": str(args.data.name),
            "teacher": "K=10 at T=1 + greedy default, 16 new tokens, batch 8",
        },
        "prompts": n,
        "hf_1_thread": {
            "threads": 1,
            "seconds": runs["hf_1_thread"][0],
            "prompts_per_s": rate("hf_1_thread"),
        },
        "hf": {"threads": args.threads, "seconds": runs["hf"][0], "prompts_per_s": rate("hf")},
        "ray": {
            "workers": args.workers,
            "threads_per_worker": 1,
            "seconds": runs["ray"][0],
            "prompts_per_s": rate("ray"),
            "includes": "starting a local Ray and loading the model in each actor",
        },
        "ray_over_hf": rate("ray") / rate("hf"),
        "ray_over_hf_1_thread": rate("ray") / rate("hf_1_thread"),
        "same_answers": runs["hf_1_thread"][1] == runs["ray"][1],
        "hidden_max_abs_diff": float((h1 - hr).abs().max()) if h1.shape == hr.shape else None,
        "same_answers_hf_threads": runs["hf_1_thread"][1] == runs["hf"][1],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "meta"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
