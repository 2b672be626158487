"""Shared test helpers (moved from test_calibration.py; used by several test modules)."""

from __future__ import annotations

import numpy as np

from ssd_guard.calibration import (
    CalibrationFile,
    save_calibration,
)
from ssd_guard.training.calibration import (
    calibrate_threshold,
)

#: Fixed candidate thresholds (chosen without looking at any labels).
GRID = np.linspace(0.05, 1.0, 20)


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores uniform on [0, 1], P(wrong | score s) = s²: answering at or below t has a
    true error rate of exactly t² / 3 among the answered."""
    s = rng.random(n)
    return s, rng.random(n) < s**2


def _file(fingerprint: str = "abc123") -> CalibrationFile:
    rng = np.random.default_rng(4)
    s, w = _draw(rng, 400)
    res = calibrate_threshold(s, w, alpha=0.2, delta=0.1, grid=GRID)
    return CalibrationFile.from_result(
        res, student_fingerprint=fingerprint, signal="entropy", data={"split": "validation"}
    )


def _student_with_calibration(tmp_path, fingerprint: str | None = None):  # type: ignore[no-untyped-def]
    import shutil

    from ssd_guard.artifact import bundled_artifact_path, load_artifact

    student = tmp_path / "student"
    shutil.copytree(bundled_artifact_path(), student)
    fp = fingerprint or load_artifact(student)[0].fingerprint
    save_calibration(_file(fp), student)
    return student
