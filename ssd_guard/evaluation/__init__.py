"""`ssd-guard evaluate`: metrics, the evaluation run, its report and plots.

Entry point: :func:`ssd_guard.evaluation.runner.run_evaluation` (imported lazily here,
since it pulls in torch and the scorers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_evaluation"]


def __getattr__(name: str) -> Any:
    if name == "run_evaluation":
        from ssd_guard.evaluation.runner import run_evaluation

        return run_evaluation
    raise AttributeError(name)
