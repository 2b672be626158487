"""Reading the distillation stages' outputs back: teacher records, splits, labels, PCA, features."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.encoding import PCAProjection
from ssd_guard.errors import ConfigError
from ssd_guard.training.distill.workdir import load_prompts, load_teacher

if TYPE_CHECKING:
    from ssd_guard.training.distill.workdir import Workdir


def _ordered_teacher(
    wd: Workdir,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor]:
    prompts = load_prompts(wd)
    records, hidden = load_teacher(wd)
    if [r["id"] for r in records] != [p["id"] for p in prompts]:
        raise ConfigError(
            f"{wd.root}: teacher shards do not cover prompts.jsonl in order; rerun --force teacher"
        )
    return prompts, records, hidden


def _split_index(wd: Workdir, prompts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    splits = wd.read_json("split.json")
    pos = {p["id"]: i for i, p in enumerate(prompts)}
    return {k: np.array([pos[i] for i in v], dtype=np.int64) for k, v in splits.items()}


def load_labels(wd: Workdir) -> list[dict[str, Any]]:
    with wd.path("labels.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def load_pca(wd: Workdir) -> PCAProjection:
    return PCAProjection.from_tensors(load_file(str(wd.path("pca.safetensors"))), prefix="")


def teacher_dispersion(samples: torch.Tensor) -> torch.Tensor:
    """TD: mean per-dimension standard deviation of each prompt's K answer embeddings."""
    return samples.float().std(dim=1, unbiased=True).mean(dim=-1)


def load_features(wd: Workdir) -> torch.Tensor:
    return load_file(str(wd.path("features.safetensors")))["hidden"]


def load_pooled(wd: Workdir) -> torch.Tensor | None:
    return load_file(str(wd.path("features.safetensors"))).get("pooled")
