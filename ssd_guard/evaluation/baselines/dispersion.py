"""TD (teacher dispersion): the spread of the K sampled answers' embeddings.

The SSD paper's TD baseline is the standard deviation of the teacher's sampled answer
embeddings; the trace of their covariance is reported beside it. Both read the
``sample_embeddings`` statistic, so TD costs K generations plus K embeddings per prompt
at inference.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ssd_guard.training.stats import Scorer, Stats

__all__ = ["TeacherDispersion", "dispersion"]

Statistic = Literal["std", "trace"]


def dispersion(
    embeddings: np.ndarray, statistic: Statistic = "std", *, ddof: int = 1
) -> np.ndarray:
    """Spread of ``[N, K, E]`` answer embeddings per prompt, ``[N]``.

    ``std``: the mean over dimensions of the per-dimension standard deviation (the
    distillation's TD, ``ssd_guard.training.distill.stages_late.teacher_dispersion``).
    ``trace``: the trace of the covariance. ``ddof=1`` (unbiased, the default) or 0.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"embeddings must be [N, K, E]; got shape {x.shape}")
    k = x.shape[1]
    if k - ddof <= 0:
        return np.zeros(x.shape[0])
    var = x.var(axis=1, ddof=ddof)  # [N, E]
    if statistic == "std":
        return np.asarray(np.sqrt(var).mean(axis=1))
    if statistic == "trace":
        return np.asarray(var.sum(axis=1))
    raise ValueError(f"unknown statistic {statistic!r}; use 'std' or 'trace'")


class TeacherDispersion(Scorer):
    """Spread of the teacher's K sampled answers (higher = riskier).

    Args:
        statistic: ``"std"`` (the paper's) or ``"trace"`` (trace of the covariance).
        projection: optional ``(mean [E], components [D, E], scale [D] | None)``: measure
            the spread in a PCA space (e.g. the student's target space) instead of the
            raw embedding space.
        ddof: delta degrees of freedom of the variances (1: unbiased, as distillation).
        name: the name reported; defaults to ``TD-std`` / ``TD-trace``.

    Answer-level score: ``1 - cos(default answer, mean of the samples)``, how far the
    answer given lies from the teacher's consensus.
    """

    needs = frozenset({"sample_embeddings"})
    answer_needs = frozenset({"default_embeddings"})

    def __init__(
        self,
        statistic: Statistic = "std",
        *,
        projection: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
        ddof: int = 1,
        name: str | None = None,
        calculator: object | None = None,
    ) -> None:
        if statistic not in ("std", "trace"):
            raise ValueError(f"unknown statistic {statistic!r}; use 'std' or 'trace'")
        self.statistic = statistic
        self.projection = projection
        self.ddof = ddof
        self.name = name or f"TD-{statistic}"
        self.calculator = calculator  # type: ignore[assignment]

    def _project(self, x: np.ndarray) -> np.ndarray:
        if self.projection is None:
            return x
        mean, comps, scale = self.projection
        z = (x - np.asarray(mean)) @ np.asarray(comps).T
        if scale is not None:
            z = z / np.asarray(scale)
        return np.asarray(z)

    def score(self, stats: Stats) -> np.ndarray:
        stats.require(self.needs, self.name)
        assert stats.sample_embeddings is not None
        return dispersion(self._project(stats.sample_embeddings), self.statistic, ddof=self.ddof)

    def score_answers(self, stats: Stats) -> np.ndarray:
        stats.require(self.needs | self.answer_needs, self.name)
        assert stats.sample_embeddings is not None and stats.default_embeddings is not None
        centre = np.asarray(stats.sample_embeddings, dtype=np.float64).mean(axis=1)
        centre /= np.maximum(np.linalg.norm(centre, axis=1, keepdims=True), 1e-12)
        d = np.asarray(stats.default_embeddings, dtype=np.float64)
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
        return np.asarray(1.0 - (centre * d).sum(axis=1))
