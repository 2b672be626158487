"""Shared test helpers (moved from test_fastpaths.py; used by several test modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers.tiny import save_student_artifact

LAYER = 3

FEW_SHOT = "Question: What is the capital of France?\nAnswer: Paris\n\n"

QUESTIONS = [
    "What is the capital of Peru?",
    "Who wrote Hamlet?",
    "Which planet is known as the red planet in our solar system?",
    "Hi",
    "In which year did the Berlin Wall fall, ending the division of the city?",
    "What is the chemical symbol for gold?",
]


def _build_artifact(root: Path, lm: Any, *, layer: int) -> Path:
    from ssd_guard.encoding import PCAProjection

    gen = torch.Generator().manual_seed(0)
    n, s, emb_dim = 48, 3, 384
    x = torch.randn(n, lm.hidden_size, generator=gen)
    pca = PCAProjection.fit(torch.randn(64, emb_dim, generator=gen), 8)
    z = torch.randn(n, s, 8, generator=gen)
    return save_student_artifact(root, lm, layer=layer, pca=pca, x=x, z=z, few_shot=FEW_SHOT)
