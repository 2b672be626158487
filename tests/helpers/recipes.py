"""Shared test helpers (moved from test_distill.py; used by several test modules)."""

from __future__ import annotations

from pathlib import Path

from helpers.paths import DATA
from ssd_guard.training.distill.recipe import Recipe


def tiny_recipe(model: Path, workdir: Path, **over) -> Recipe:
    raw = {
        "name": "tiny",
        "base_model": str(model),
        "dtype": "fp32",
        "device": "cpu",
        "workdir": str(workdir),
        "data": {"path": str(DATA / "triviaqa_40.jsonl"), "limit": 20, "split": [0.5, 0.25, 0.25]},
        "prompt": {"few_shot": "Question: What is the capital of France?\nAnswer: Paris\n\n"},
        "teacher": {"n_samples": 4, "max_new_tokens": 5, "batch_size": 4, "shard_size": 4},
        "student": {
            "grid": {"n_components": [1, 2], "hidden": [16], "depth": [1]},
            "max_epochs": 20,
            "patience": 5,
        },
        "embedding": {"pca_dim_risk": 4, "pca_dim_answer": 8},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return Recipe.model_validate(raw)


def smollm2_teacher_recipe(workdir: Path, *, n_samples: int = 3, **teacher: object) -> Recipe:
    """A teacher-stage recipe on the real SmolLM2 (8 TriviaQA prompts, 4 shards of 2, fp32
    on one CPU thread), for comparing teacher backends; *teacher* adds teacher keys."""
    return Recipe.model_validate(
        {
            "name": "teacher-backend",
            "base_model": "smollm2-135m-instruct",
            "dtype": "fp32",
            "device": "cpu",
            "threads": 1,
            "workdir": str(workdir),
            "data": {
                "path": str(DATA / "triviaqa_40.jsonl"),
                "limit": 8,
                "split": [0.5, 0.25, 0.25],
            },
            "prompt": {"few_shot": "Question: What is the capital of France?\nAnswer: Paris\n\n"},
            "teacher": {
                "n_samples": n_samples,
                "max_new_tokens": 6,
                "batch_size": 2,
                "shard_size": 2,
                **teacher,
            },
        }
    )
