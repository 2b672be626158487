"""The SSD paper's reference numbers that `ssd-guard evaluate` compares against (shared by
the runner, which stores them in ``results.json``, and the report, which compares)."""

from __future__ import annotations

from typing import Any

__all__ = ["POST_REFERENCE", "REFERENCE", "REFERENCE_MAP"]

#: The SSD paper's numbers: macro AUROC over 3B–8B models, and the mismatch range.
REFERENCE: dict[str, Any] = {
    "source": "SSD paper: hallucination AUROC, macro average over 3B-8B base models",
    "hallucination_auroc": {"SE": 0.804, "PCP": 0.771, "SEP": 0.759, "SSD": 0.708, "TD": 0.699},
    "mismatch_auroc": [0.89, 0.99],
}
#: Which of our scorers each reference number corresponds to.
REFERENCE_MAP = {"SE": "SE-cos", "PCP": "PCP", "SEP": "SEP", "SSD": "SSD", "TD": "TD-std"}

#: Post-generation scorers' published TriviaQA figures (paper, models, AUROC).
POST_REFERENCE: dict[str, dict[str, Any]] = {
    "SemGrad": {
        "auroc": 0.86,
        "source": "SemGrad (arXiv 2605.04638): TriviaQA hallucination AUROC, 4B-8B models",
    },
}
