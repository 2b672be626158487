"""Calibrated thresholds: the Learn-then-Test guarantee holds at its stated
frequency on synthetic scores with a known error rate; infeasible targets and another
student's calibration give clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.calibration import GRID, _draw, _file, _student_with_calibration

from ssd_guard.calibration import (
    CalibrationError,
    CalibrationMismatchError,
    InfeasibleTargetError,
    describe_guarantee,
    load_calibration,
    save_calibration,
)
from ssd_guard.errors import ConfigError, SSDGuardError
from ssd_guard.training.calibration import (
    calibrate_threshold,
    realised_error,
    smallest_feasible_alpha,
)


def test_guarantee_holds_at_the_stated_frequency() -> None:
    alpha, delta = 0.2, 0.1
    rng = np.random.default_rng(0)
    n_runs, violations, realised_violations, answered = 300, 0, 0, 0
    for _ in range(n_runs):
        s, w = _draw(rng, 400)
        cal = calibrate_threshold(s, w, alpha=alpha, delta=delta, grid=GRID)
        assert cal.n_calibration == 400
        assert cal.threshold in cal.valid_thresholds
        # The population error among answered is known: threshold² / 3.
        violations += int(cal.threshold**2 / 3 > alpha)
        st, wt = _draw(rng, 2000)
        realised_violations += int(realised_error(st, wt, cal.threshold, True) > alpha)
        answered += int(cal.coverage > 0)
    assert violations / n_runs <= delta
    assert realised_violations / n_runs <= delta
    # Not vacuous: the controller lets answers through in every run (true max t ≈ 0.77).
    assert answered == n_runs


def test_guarantee_on_resplits_of_one_sample() -> None:
    """The benchmark's protocol: random calibration/test re-splits of one pool."""
    alpha, delta = 0.25, 0.1
    rng = np.random.default_rng(1)
    s, w = _draw(rng, 1200)
    bad = 0
    for _ in range(200):
        perm = rng.permutation(len(s))
        cal, test = perm[:400], perm[400:]
        c = calibrate_threshold(s[cal], w[cal], alpha=alpha, delta=delta, grid=GRID)
        bad += int(realised_error(s[test], w[test], c.threshold, True) > alpha)
    assert bad / 200 <= delta


def test_lower_is_riskier_signals_mirror() -> None:
    rng = np.random.default_rng(2)
    s, w = _draw(rng, 500)
    hi = calibrate_threshold(s, w, alpha=0.2, delta=0.1, grid=GRID)
    lo = calibrate_threshold(-s, w, alpha=0.2, delta=0.1, grid=-GRID, higher_is_riskier=False)
    assert lo.threshold == pytest.approx(-hi.threshold)
    assert lo.coverage == pytest.approx(hi.coverage)
    assert np.array_equal(lo.accept(-s), hi.accept(s))


def test_infeasible_target_names_the_smallest_feasible_alpha() -> None:
    rng = np.random.default_rng(3)
    s, w = _draw(rng, 400)
    smallest = smallest_feasible_alpha(s, w, delta=0.1, grid=GRID)
    assert smallest is not None and 0.0 < smallest < 0.2
    with pytest.raises(InfeasibleTargetError) as info:
        calibrate_threshold(s, w, alpha=0.01, delta=0.1, grid=GRID)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, SSDGuardError)
    assert info.value.smallest_feasible_alpha == smallest
    assert f"smallest feasible alpha at delta=0.1 is {smallest:.2f}" in str(info.value)
    # ...and that alpha is indeed feasible.
    calibrate_threshold(s, w, alpha=smallest, delta=0.1, grid=GRID)


def test_nothing_feasible_says_so() -> None:
    s = np.linspace(0, 1, 50)
    w = np.ones(50, dtype=bool)
    with pytest.raises(InfeasibleTargetError, match="no alpha below 1 is feasible") as info:
        calibrate_threshold(s, w, alpha=0.5, delta=0.1)
    assert info.value.smallest_feasible_alpha is None


@pytest.mark.parametrize(
    ("alpha", "delta", "match"),
    [(0.0, 0.1, "alpha"), (1.2, 0.1, "alpha"), (0.2, 0.0, "delta"), (0.2, 1.0, "delta")],
)
def test_bad_targets(alpha: float, delta: float, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        calibrate_threshold([0.1, 0.2], [True, False], alpha=alpha, delta=delta)


def test_bad_inputs() -> None:
    with pytest.raises(CalibrationError, match="2 scores but 3 labels"):
        calibrate_threshold([0.1, 0.2], [True, False, True], alpha=0.2, delta=0.1)
    with pytest.raises(CalibrationError, match="NaN"):
        calibrate_threshold([0.1, float("nan")], [True, False], alpha=0.2, delta=0.1)


def test_file_round_trip_and_mismatched_student(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cal = _file()
    path = save_calibration(cal, tmp_path)
    assert path.name == "calibration.json"
    back = load_calibration(tmp_path, fingerprint="abc123")
    assert back == cal
    for key in ("alpha", "delta", "threshold", "valid_thresholds", "n_calibration", "coverage"):
        assert getattr(back, key) == getattr(cal, key)
    with pytest.raises(CalibrationMismatchError) as info:
        load_calibration(path, fingerprint="other999")
    msg = str(info.value)
    assert "abc123" in msg and "other999" in msg and "ssd-guard calibrate" in msg
    assert isinstance(info.value, SSDGuardError)


def test_missing_or_broken_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CalibrationError, match="no calibration file"):
        load_calibration(tmp_path / "nope.json")
    bad = tmp_path / "calibration.json"
    bad.write_text('{"alpha": 0.2}', encoding="utf-8")
    with pytest.raises(CalibrationError, match="not a valid calibration file"):
        load_calibration(bad)


def test_guarantee_in_plain_words() -> None:
    text = describe_guarantee(_file())
    assert "at most 20% are wrong" in text
    assert "at least 90%" in text
    assert "exchangeable" in text


def test_cli_registers_calibrate() -> None:
    from ssd_guard.cli import build_parser

    args = build_parser().parse_args(
        ["calibrate", "--workdir", "w", "--alpha", "0.2", "--delta", "0.05"]
    )
    assert args.command == "calibrate"
    assert (args.alpha, args.delta, args.signal, args.artifact) == (0.2, 0.05, "entropy", "bundled")
    assert args.source is None and args.out is None


def test_candidates_answering_nothing_are_ignored() -> None:
    """Thresholds below every calibration score would have a NaN p-value in MAPIE."""
    rng = np.random.default_rng(5)
    s, w = _draw(rng, 300)
    grid = np.concatenate([np.linspace(-2.0, -1.0, 5), GRID])
    a = calibrate_threshold(s, w, alpha=0.3, delta=0.1, grid=grid)
    assert a.threshold > 0 and a.coverage > 0


# ---------------------------------------------------------------- policies: calibrated bounds
_POLICY = """name: p
student: {student}
rules:
  - name: stop-uncalibrated
    scope: prompt
    when: {{entropy: {{calibrated: {{max_error: {max_error}, confidence: {confidence}}}}}}}
    action: abstain
"""


def _write_policy(tmp_path, max_error: float = 0.2, confidence: float = 0.9):  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    text = _POLICY.format(student="student", max_error=max_error, confidence=confidence)
    path.write_text(text, encoding="utf-8")
    return path


def test_policy_calibrated_bound_round_trip(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ssd_guard.cli import main
    from ssd_guard.policy import load_policy

    student = _student_with_calibration(tmp_path)
    cal = load_calibration(student)
    policy = load_policy(_write_policy(tmp_path))
    assert policy.resolve_thresholds("stop-uncalibrated") == {"entropy.gt": cal.threshold}
    above = policy.decide("prompt", {"entropy": cal.threshold + 0.01})
    below = policy.decide("prompt", {"entropy": cal.threshold - 0.01})
    assert above.action == "abstain" and below.action == "allow"
    assert main(["check-policy", str(tmp_path / "p.yaml")]) == 0
    out = capsys.readouterr().out
    assert "calibrated guarantee" in out and "at most 20% are wrong" in out
    assert "exchangeable" in out


def test_policy_calibrated_bound_refusals(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ssd_guard.cli import main
    from ssd_guard.errors import PolicyError
    from ssd_guard.policy import Policy, load_policy

    # missing calibration file
    (tmp_path / "a").mkdir()
    import shutil

    from ssd_guard.artifact import bundled_artifact_path

    shutil.copytree(bundled_artifact_path(), tmp_path / "a" / "student")
    with pytest.raises(PolicyError, match="no calibration file"):
        load_policy(_write_policy(tmp_path / "a"))
    # another student's calibration
    (tmp_path / "b").mkdir()
    _student_with_calibration(tmp_path / "b", fingerprint="0000000000000000")
    path = _write_policy(tmp_path / "b")
    with pytest.raises(PolicyError, match="fingerprint 0000000000000000"):
        load_policy(path)
    assert main(["check-policy", str(path)]) == 1
    assert "re-run `ssd-guard calibrate`" in capsys.readouterr().err
    # a stricter target than the calibration guarantees
    (tmp_path / "c").mkdir()
    _student_with_calibration(tmp_path / "c")
    with pytest.raises(PolicyError, match=r"re-run `ssd-guard calibrate --alpha 0.1 --delta 0.1`"):
        load_policy(_write_policy(tmp_path / "c", max_error=0.1))
    # built in code, never resolved: deciding refuses rather than matching silently
    raw = Policy.from_yaml_text(_POLICY.format(student="bundled", max_error=0.2, confidence=0.9))
    with pytest.raises(PolicyError, match="not resolved"):
        raw.decide("prompt", {"entropy": 0.0})


# ---------------------------------------------------------------- answer / escalate / abstain
def test_two_sided_guarantees_hold_jointly_at_the_stated_frequency() -> None:
    """P(wrong | s) = s²: answering at or below t errs at t²/3; abstaining at or above u
    has a share of right answers of (1 - u) - (1 - u³)/3 over (1 - u), known exactly."""
    from ssd_guard.training.calibration import calibrate_selective

    alpha, beta, delta = 0.2, 0.35, 0.1
    rng = np.random.default_rng(3)
    n_runs, bad, bands = 200, 0, 0
    for _ in range(n_runs):
        s, w = _draw(rng, 500)
        sel = calibrate_selective(s, w, alpha=alpha, beta=beta, delta=delta, grid=GRID)
        t, u = sel.answer.threshold, sel.abstain_threshold
        answer_err = t**2 / 3
        abstain_right = 0.0
        if u is not None:
            assert u > t
            right_mass = (1 - u) - (1 - u**3) / 3
            abstain_right = right_mass / (1 - u)
        bad += int(answer_err > alpha or abstain_right > beta)
        routes = sel.route(s)
        assert set(routes) <= {"answer", "escalate", "abstain"}
        assert sum(sel.shares.values()) == pytest.approx(1.0)
        bands += int(u is not None and sel.shares["escalate"] > 0)
    assert bad / n_runs <= delta
    assert bands >= 0.9 * n_runs  # not vacuous: nearly every run has all three regions


def test_two_sided_lower_is_riskier_mirrors() -> None:
    from ssd_guard.training.calibration import calibrate_selective

    rng = np.random.default_rng(4)
    s, w = _draw(rng, 800)
    a = calibrate_selective(s, w, alpha=0.2, beta=0.35, delta=0.1, grid=GRID)
    b = calibrate_selective(
        -s, w, alpha=0.2, beta=0.35, delta=0.1, grid=-GRID, higher_is_riskier=False
    )
    assert b.answer.threshold == pytest.approx(-a.answer.threshold)
    assert b.abstain_threshold == pytest.approx(-(a.abstain_threshold or 0.0))
    assert b.shares == pytest.approx(a.shares)
    with pytest.raises(CalibrationError, match="beta"):
        calibrate_selective(s, w, alpha=0.2, beta=1.5, delta=0.1)


def test_risk_signal_needs_a_risk_model() -> None:
    from ssd_guard.calibration import SIGNAL_DIRECTIONS, calibration_filename

    assert SIGNAL_DIRECTIONS["risk"] is True
    assert calibration_filename("entropy") == "calibration.json"
    assert calibration_filename("risk") == "calibration-risk.json"
