"""Calibrated thresholds at run time: the calibration file a policy reads.

The thresholds are *fitted* offline (:mod:`ssd_guard.training.calibration`,
``ssd-guard calibrate``); this module holds what the runtime needs: the file's format
(:class:`CalibrationFile`, bound to one student's fingerprint), reading and writing it,
the guarantee in words, and the calibration errors. What the fitting guarantees:

Given a calibration split (prompts the student was neither trained nor tested on) with a
signal's scores and "the default answer is wrong" labels, :func:`calibrate_threshold`
chooses the threshold ``t`` of the rule *answer when the signal is on the safe side of t,
abstain otherwise* such that

    among the answers let through, the error rate is at most α, with probability at
    least 1 − δ over the draw of the calibration split,

assuming the calibration prompts and the future prompts are exchangeable (drawn from the
same distribution). The statistics are MAPIE's (``mapie.risk_control``, pinned
``mapie==1.6.0``): a :class:`~mapie.risk_control.BinaryClassificationController` that
controls the *precision* of "answer" (= 1 − error among answered) at level 1 − α with
Hoeffding–Bentkus p-values per candidate threshold and a Bonferroni–Holm family-wise
correction over the candidate grid (Angelopoulos et al., "Learn then Test", 2022).

The candidate grid must not look at the calibration labels: the CLI takes it from the
student's own training-split calibration values (quantiles), never from the labels.

A :class:`CalibrationFile` (JSON, beside the student artifact by default) holds the
result bound to the student's fingerprint; :func:`load_calibration` refuses it for
another student.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ssd_guard.artifact import file_in
from ssd_guard.errors import ConfigError
from ssd_guard.signals import SIGNALS

__all__ = [
    "CALIBRATION_FILENAME",
    "SIGNAL_DIRECTIONS",
    "CalibrationError",
    "CalibrationFile",
    "CalibrationMismatchError",
    "InfeasibleTargetError",
    "calibration_filename",
    "describe_guarantee",
    "load_calibration",
    "save_calibration",
]

#: The default file name, written beside the student artifact.
CALIBRATION_FILENAME = "calibration.json"

#: For each known signal: ``True`` when a higher value means a riskier prompt/answer
#: (the guard answers at or below the threshold), ``False`` when lower is riskier (the
#: guard answers at or above it).
SIGNAL_DIRECTIONS: dict[str, bool] = {
    name: sig.higher_is_riskier for name, sig in SIGNALS.items() if sig.calibratable
}


def calibration_filename(signal: str) -> str:
    """The file a calibration of *signal* is written to beside the student
    (``calibration.json`` for ``entropy``, ``calibration-<signal>.json`` otherwise)."""
    return CALIBRATION_FILENAME if signal == "entropy" else f"calibration-{signal}.json"


def _accept(scores: np.ndarray, threshold: float, higher_is_riskier: bool) -> np.ndarray:
    return scores <= threshold if higher_is_riskier else scores >= threshold


class CalibrationError(ConfigError):
    """A calibration cannot be made or used."""


class InfeasibleTargetError(CalibrationError):
    """No threshold guarantees the target error rate at the requested confidence.
    :attr:`smallest_feasible_alpha` is the smallest α (on a 0.01 grid) that can be
    guaranteed at the same δ on the same calibration data (``None`` if none below 1)."""

    def __init__(self, message: str, smallest_feasible_alpha: float | None) -> None:
        super().__init__(message)
        self.smallest_feasible_alpha = smallest_feasible_alpha


class CalibrationMismatchError(CalibrationError):
    """The calibration file was made for another student (fingerprint mismatch)."""


#: The fields a calibration file takes from the Learn-then-Test result.
_FROM_RESULT = (
    "higher_is_riskier",
    "alpha",
    "delta",
    "threshold",
    "valid_thresholds",
    "n_calibration",
    "coverage",
    "calibration_error",
)


class CalibrationFile(BaseModel):
    """A calibration bound to one student (``student_fingerprint``)."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    student_fingerprint: str
    signal: str
    higher_is_riskier: bool
    alpha: float
    delta: float
    threshold: float
    valid_thresholds: list[float]
    n_calibration: int
    coverage: float
    calibration_error: float
    #: two-sided selective answering (``--abstain-beta``): abstain beyond this threshold,
    #: escalate between the two; ``None`` when only the answer threshold was calibrated
    abstain_threshold: float | None = None
    abstain_beta: float | None = None
    shares: dict[str, float] = {}
    #: where the calibration prompts came from (work directory, split, source)
    data: dict[str, Any] = {}
    method: str = (
        "Learn-then-Test: mapie.risk_control.BinaryClassificationController, precision of "
        "'answer' >= 1 - alpha, Hoeffding-Bentkus p-values, Bonferroni-Holm over the grid"
    )
    mapie_version: str = ""

    @classmethod
    def from_result(
        cls,
        result: Any,
        *,
        student_fingerprint: str,
        signal: str,
        data: dict[str, Any] | None = None,
    ) -> CalibrationFile:
        """From a fit's result (:class:`ssd_guard.training.calibration.ThresholdCalibration`:
        ``higher_is_riskier``, ``alpha``, ``delta``, ``threshold``, ``valid_thresholds``,
        ``n_calibration``, ``coverage``, ``calibration_error``)."""
        try:
            import mapie

            version = str(getattr(mapie, "__version__", ""))
        except ImportError:  # pragma: no cover
            version = ""
        return cls(
            student_fingerprint=student_fingerprint,
            signal=signal,
            **{k: getattr(result, k) for k in _FROM_RESULT},
            data=data or {},
            mapie_version=version,
        )

    def accept(self, scores: Any) -> np.ndarray:
        return _accept(np.asarray(scores, dtype=np.float64), self.threshold, self.higher_is_riskier)


def save_calibration(cal: CalibrationFile, path: str | Path) -> Path:
    """Write *cal* to *path* (a file, or a directory → ``<dir>/calibration.json``)."""
    p = file_in(path, CALIBRATION_FILENAME)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cal.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    return p


def load_calibration(path: str | Path, *, fingerprint: str | None = None) -> CalibrationFile:
    """Read a calibration file (or ``<dir>/calibration.json``); with *fingerprint* (the
    student's :attr:`SSDScorer.fingerprint`), refuse a calibration of another student."""
    p = file_in(path, CALIBRATION_FILENAME)
    if not p.is_file():
        raise CalibrationError(
            f"no calibration file at {p}: run `ssd-guard calibrate` for this student first"
        )
    try:
        cal = CalibrationFile.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise CalibrationError(f"{p} is not a valid calibration file: {exc}") from exc
    if fingerprint is not None and cal.student_fingerprint != fingerprint:
        raise CalibrationMismatchError(
            f"{p} calibrates the student with fingerprint {cal.student_fingerprint}, but the "
            f"student in use has fingerprint {fingerprint}: its thresholds do not carry over "
            "to another student; re-run `ssd-guard calibrate` with this student"
        )
    return cal


def describe_guarantee(cal: CalibrationFile) -> str:
    """The guarantee in plain words, with what it assumes."""
    side = "at most" if cal.higher_is_riskier else "at least"
    conf = 1.0 - cal.delta
    return (
        f"The guard answers when {cal.signal} is {side} {cal.threshold:.4g} and does not "
        f"answer otherwise. Among the answers it lets through, at most {cal.alpha:.0%} are wrong, "
        f"with probability at least {conf:.0%} over the {cal.n_calibration} calibration "
        f"prompts (it answered {cal.coverage:.1%} of them). This assumes future prompts are "
        "exchangeable with the calibration prompts (same distribution, same base model and "
        "student); it is a statement about the long-run share of wrong answers, not about "
        "any single answer."
    ) + _describe_abstain(cal)


def _describe_abstain(cal: CalibrationFile) -> str:
    if cal.abstain_threshold is None or cal.abstain_beta is None:
        return ""
    side = "at least" if cal.higher_is_riskier else "at most"
    shares = cal.shares or {}
    return (
        f" It abstains when {cal.signal} is {side} {cal.abstain_threshold:.4g}: among those "
        f"prompts at most {cal.abstain_beta:.0%} would have been answered right; in between "
        f"it escalates (e.g. retrieves). Both statements hold together with probability at "
        f"least {1.0 - cal.delta:.0%} (calibration shares: answer "
        f"{shares.get('answer', float('nan')):.1%}, escalate "
        f"{shares.get('escalate', float('nan')):.1%}, abstain "
        f"{shares.get('abstain', float('nan')):.1%})."
    )
