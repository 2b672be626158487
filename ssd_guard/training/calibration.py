"""Fitting thresholds with a stated guarantee: Learn-then-Test risk control.

Given a calibration split (prompts the student was neither trained nor tested on) with a
signal's scores and "the default answer is wrong" labels, :func:`calibrate_threshold`
chooses the threshold ``t`` of the rule *answer when the signal is on the safe side of t,
abstain otherwise* such that among the answers let through the error rate is at most α,
with probability at least 1 − δ over the draw of the calibration split (MAPIE's
Learn-then-Test controller; see :mod:`ssd_guard.calibration` for the file the runtime
reads). Offline only: ``ssd-guard calibrate`` and the calibration benchmark use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssd_guard.calibration import (
    SIGNAL_DIRECTIONS,
    CalibrationError,
    InfeasibleTargetError,
    _accept,
)

#: The α resolution at which the smallest feasible α is reported.
_ALPHA_STEP = 0.01

__all__ = [
    "SelectiveCalibration",
    "ThresholdCalibration",
    "calibrate_selective",
    "calibrate_threshold",
    "default_grid",
    "realised_error",
    "signal_grid",
    "smallest_feasible_alpha",
    "workdir_signal",
]


@dataclass(frozen=True)
class ThresholdCalibration:
    """The outcome of :func:`calibrate_threshold`."""

    alpha: float
    delta: float
    higher_is_riskier: bool
    #: the chosen threshold: the valid one that lets the most calibration answers through
    threshold: float
    #: every candidate threshold whose risk is controlled (after the FWER correction)
    valid_thresholds: list[float]
    n_calibration: int
    #: share of calibration prompts answered at :attr:`threshold`
    coverage: float
    #: error rate among the calibration prompts answered at :attr:`threshold`
    calibration_error: float

    def accept(self, scores: Any) -> np.ndarray:
        """Boolean mask: which of *scores* the guard answers."""
        return _accept(np.asarray(scores, dtype=np.float64), self.threshold, self.higher_is_riskier)


def default_grid(reference: Sequence[float] | np.ndarray, n: int = 50) -> np.ndarray:
    """Candidate thresholds: *n* quantiles (from 2 % to 100 %) of *reference* values that
    carry no calibration labels (e.g. the student's training-split calibration values)."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise CalibrationError("cannot build a threshold grid from no finite values")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, n + 1)[1:]))


def signal_grid(calibration: dict[str, list[float]], signal: str, n: int = 50) -> np.ndarray:
    """Candidate thresholds for *signal* that look at no calibration data: ``risk`` is a
    probability, so a fixed grid on (0, 1]; the other signals: quantiles of the student's
    stored training-split values (:func:`default_grid`)."""
    if signal == "risk":
        return np.linspace(0.0, 1.0, 2 * n + 1)[1:]
    if not calibration.get(signal):
        raise CalibrationError(f"the student stores no values of {signal!r} to build a grid on")
    return default_grid(calibration[signal], n=n)


def _check_inputs(
    scores: Any, wrong: Any, alpha: float, delta: float
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.asarray(wrong, dtype=bool).ravel()
    if s.shape != w.shape:
        raise CalibrationError(f"{s.size} scores but {w.size} labels")
    if s.size == 0:
        raise CalibrationError("the calibration split is empty")
    if not np.all(np.isfinite(s)):
        raise CalibrationError("calibration scores contain NaN or infinite values")
    if not 0.0 < alpha < 1.0:
        raise CalibrationError(
            f"alpha (the error rate to guarantee) must be in (0, 1), got {alpha}"
        )
    if not 0.0 < delta < 1.0:
        raise CalibrationError(f"delta (1 − confidence) must be in (0, 1), got {delta}")
    return s, w


def _controller(
    s: np.ndarray,
    w: np.ndarray,
    alpha: float,
    delta: float,
    grid: np.ndarray,
    higher_is_riskier: bool,
) -> tuple[np.ndarray, float | None]:
    """Run MAPIE's controller; return (valid thresholds, best threshold or None)."""
    import warnings

    from mapie.risk_control import BinaryClassificationController

    sign = -1.0 if higher_is_riskier else 1.0
    # A candidate that answers no calibration prompt has no empirical risk (MAPIE gives
    # it a NaN p-value, which poisons the Holm ordering): such candidates are dropped.
    # This looks at the calibration scores only, never at their labels.
    answers_some = np.array([_accept(s, float(t), higher_is_riskier).any() for t in grid])
    grid = grid[answers_some]
    if grid.size == 0:
        return np.array([]), None

    # "Positive" = "the default answer is right, answer it"; the controller's score is
    # the signal oriented so that higher = safer, and it predicts positive at or above a
    # parameter λ = sign · threshold.
    def predict(x: Any) -> np.ndarray:
        c = sign * np.asarray(x, dtype=np.float64).ravel()
        return np.column_stack([-c, c])

    params = sign * grid
    ctrl = BinaryClassificationController(
        predict_function=predict,
        risk="precision",
        target_level=float(1.0 - alpha),
        confidence_level=float(1.0 - delta),
        best_predict_param_choice="recall",
        list_predict_params=params,
        fwer_method="bonferroni_holm",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctrl.calibrate(s, (~w).astype(int))
    valid = np.sort(sign * np.asarray(ctrl.valid_predict_params, dtype=np.float64))
    best = ctrl.best_predict_param
    return valid, (None if best is None else float(sign * float(best)))


def smallest_feasible_alpha(
    scores: Any,
    wrong: Any,
    *,
    delta: float,
    grid: Any = None,
    higher_is_riskier: bool = True,
) -> float | None:
    """The smallest α on a 0.01 grid for which some threshold is valid at this δ on this
    calibration data, or ``None`` if no α below 1 is. (Feasibility is monotone in α.)"""
    s, w = _check_inputs(scores, wrong, 0.5, delta)
    g = default_grid(s) if grid is None else np.asarray(grid, dtype=np.float64)
    alphas = np.round(np.arange(_ALPHA_STEP, 1.0, _ALPHA_STEP), 2)

    def feasible(i: int) -> bool:
        valid, _ = _controller(s, w, float(alphas[i]), delta, g, higher_is_riskier)
        return valid.size > 0

    lo, hi = 0, len(alphas) - 1
    if not feasible(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return float(alphas[lo])


def calibrate_threshold(
    scores: Any,
    wrong: Any,
    *,
    alpha: float,
    delta: float,
    grid: Any = None,
    higher_is_riskier: bool = True,
) -> ThresholdCalibration:
    """Choose the threshold so that, among answered prompts, the error rate is ≤ *alpha*
    with probability ≥ 1 − *delta* (Learn-then-Test, MAPIE).

    *scores*: the signal on the calibration prompts; *wrong*: ``True`` where the default
    answer is wrong; *grid*: candidate thresholds chosen without the calibration labels
    (default: quantiles of *scores*). Raises :class:`InfeasibleTargetError`, naming the
    smallest feasible α at this δ, when no candidate is valid.
    """
    s, w = _check_inputs(scores, wrong, alpha, delta)
    g = default_grid(s) if grid is None else np.asarray(grid, dtype=np.float64)
    valid, best = _controller(s, w, alpha, delta, g, higher_is_riskier)
    if best is None or valid.size == 0:
        smallest = smallest_feasible_alpha(
            s, w, delta=delta, grid=g, higher_is_riskier=higher_is_riskier
        )
        base = float(w.mean())
        what = (
            f"the smallest feasible alpha at delta={delta} is {smallest:.2f}"
            if smallest is not None
            else f"no alpha below 1 is feasible at delta={delta}"
        )
        raise InfeasibleTargetError(
            f"cannot guarantee an error rate <= {alpha} among answered prompts with "
            f"confidence {1 - delta:.3g}: {what} (calibration: n={s.size}, error rate "
            f"without abstention {base:.3f})",
            smallest,
        )
    keep = _accept(s, best, higher_is_riskier)
    return ThresholdCalibration(
        alpha=float(alpha),
        delta=float(delta),
        higher_is_riskier=higher_is_riskier,
        threshold=best,
        valid_thresholds=[float(v) for v in valid],
        n_calibration=int(s.size),
        coverage=float(keep.mean()),
        calibration_error=float(w[keep].mean()) if keep.any() else 0.0,
    )


@dataclass
class SelectiveCalibration:
    """Answer / escalate / abstain with two thresholds (:func:`calibrate_selective`)."""

    answer: ThresholdCalibration
    #: abstain beyond this threshold (None: no threshold is valid, so never abstain)
    abstain_threshold: float | None
    #: the guaranteed bound on the share of abstained prompts whose answer was right
    beta: float
    abstain_valid: list[float]
    #: shares of the calibration prompts answered / escalated (e.g. retrieval) / abstained
    shares: dict[str, float]
    #: share of right answers among the abstained calibration prompts
    abstain_right_rate: float

    def route(self, scores: Any) -> np.ndarray:
        """``"answer"`` / ``"escalate"`` / ``"abstain"`` per score."""
        s = np.asarray(scores, dtype=np.float64)
        hi = self.answer.higher_is_riskier
        out = np.full(s.shape, "escalate", dtype=object)
        out[_accept(s, self.answer.threshold, hi)] = "answer"
        if self.abstain_threshold is not None:
            beyond = s >= self.abstain_threshold if hi else s <= self.abstain_threshold
            out[beyond] = "abstain"
        return out


def calibrate_selective(
    scores: Any,
    wrong: Any,
    *,
    alpha: float,
    beta: float,
    delta: float,
    grid: Any = None,
    higher_is_riskier: bool = True,
) -> SelectiveCalibration:
    """Selective answering in both directions: *answer* when the signal is on the safe
    side of ``t_answer``, *abstain* beyond ``t_abstain``, *escalate* (e.g. retrieve) in
    between, such that with probability ≥ 1 − *delta*, jointly,

    * among answered prompts at most *alpha* are wrong, and
    * among abstained prompts at most *beta* would have been answered right

    (two Learn-then-Test runs with MAPIE's controller at δ/2 each, a union bound; the
    abstain threshold is the valid one that abstains most, kept beyond ``t_answer``).
    """
    s, w = _check_inputs(scores, wrong, alpha, delta)
    if not 0.0 < beta < 1.0:
        raise CalibrationError(f"beta (right answers among abstentions) must be in (0, 1): {beta}")
    g = default_grid(s) if grid is None else np.asarray(grid, dtype=np.float64)
    answer = calibrate_threshold(
        s, w, alpha=alpha, delta=delta / 2, grid=g, higher_is_riskier=higher_is_riskier
    )
    # The abstain side: "positive" = the default answer is wrong, predicted beyond t; its
    # precision >= 1 - beta. Same controller with the orientation and labels flipped.
    valid, _ = _controller(s, ~w, beta, delta / 2, g, not higher_is_riskier)
    if higher_is_riskier:
        # abstain when s >= t (the flipped rule's "accept"); keep t beyond t_answer
        usable = valid[valid > answer.threshold]
        t_abs = float(usable.min()) if usable.size else None
    else:
        usable = valid[valid < answer.threshold]
        t_abs = float(usable.max()) if usable.size else None
    route = SelectiveCalibration(answer, t_abs, float(beta), [float(v) for v in valid], {}, 0.0)
    r = route.route(s)
    route.shares = {k: float(np.mean(r == k)) for k in ("answer", "escalate", "abstain")}
    ab = r == "abstain"
    route.abstain_right_rate = float((~w[ab]).mean()) if ab.any() else 0.0
    return route


def realised_error(scores: Any, wrong: Any, threshold: float, higher_is_riskier: bool) -> float:
    """Error rate among the prompts answered at *threshold* (0 when none is answered)."""
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(wrong, dtype=bool)
    keep = _accept(s, threshold, higher_is_riskier)
    return float(w[keep].mean()) if keep.any() else 0.0


# ---------------------------------------------------------------------- the file


# ---------------------------------------------------------------------- work-directory data


def workdir_signal(
    data: Any,
    ssd: Any,
    *,
    split: str | Sequence[str],
    signal: str = "entropy",
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A signal's scores and "the default answer is wrong" labels on a work directory's
    split(s), optionally one ``source`` only: ``(rows, scores, wrong)``.

    *data* is :func:`ssd_guard.training.workdir_data.load_workdir`'s result, *ssd* an
    :class:`~ssd_guard.scoring.ssd.SSDScorer`. ``entropy`` is the prompt's SSD entropy;
    ``risk`` the combined risk before generation (``pre`` variant); ``pmi`` / ``loglik``
    score the default answer (as ``benchmarks/operating_point.py``).
    """
    from ssd_guard.training.stats_scorers import SSDStatsScorer

    if signal not in SIGNAL_DIRECTIONS:
        raise CalibrationError(
            f"unknown signal {signal!r}; calibratable signals: {sorted(SIGNAL_DIRECTIONS)}"
        )
    splits = [split] if isinstance(split, str) else list(split)
    rows_list: list[int] = []
    for name in splits:
        if name not in data.split:
            raise CalibrationError(f"the work directory has no {name!r} split")
        rows_list.extend(int(i) for i in data.split[name])
    if source is not None:
        rows_list = [i for i in rows_list if str(data.prompts[i].get("source")) == source]
        if not rows_list:
            known = sorted({str(p.get("source")) for p in data.prompts})
            raise CalibrationError(
                f"no prompt of source {source!r} in split(s) {splits}; sources: {known}"
            )
    rows = np.asarray(rows_list, dtype=np.int64)
    stats = data.stats.subset(rows)
    wrong = ~np.asarray(data.correct[rows], dtype=bool)
    sc = SSDStatsScorer(ssd)
    if signal == "entropy":
        scores = np.asarray(sc.score(stats), dtype=np.float64)
    elif signal == "risk":
        # The combined risk's pre-generation variant (what a prompt-scope rule reads).
        if getattr(ssd, "risk_model", None) is None:
            raise CalibrationError(
                "signal 'risk' needs the student's risk model: run `ssd-guard fit-risk`"
            )
        from ssd_guard.training.stats_scorers import features_from_stats

        feats = features_from_stats(ssd.features, stats)
        ent = ssd.entropy_from_hidden(feats)
        risk, _ = ssd.risk_model.predict(feats.to(ent.device), ent)
        scores = np.asarray(risk.detach().double().cpu().numpy())
    else:
        if stats.default_embeddings is None:
            raise CalibrationError(f"signal {signal!r} needs the default answers' embeddings")
        sig = sc.answer_signals(stats, stats.default_embeddings)
        scores = np.asarray(sig[signal], dtype=np.float64)
    return rows, scores, wrong
