"""The guard reads the combined ``risk`` and post-generation pair scorers in policies, with
the real bundled student (which ships its risk model): scores, caching, the generation's
own token statistics, and clear refusals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers.paths import ROOT

from ssd_guard.cache import MemoryCache
from ssd_guard.errors import ArtifactMismatchError, ConfigError, PolicyError
from ssd_guard.guard import Guard
from ssd_guard.policy import Policy
from ssd_guard.testing import capture_decisions

pytestmark = pytest.mark.integration

RISK_POLICY = """
name: risk
rules:
  - name: risky-prompt
    scope: prompt
    when: {risk: {gt: 0.97}}
    action: abstain
  - name: risky-answer
    scope: answer
    when: {risk: {gt_quantile: 0.95}}
    action: log_only
"""


@pytest.fixture(scope="module")
def scorer():
    from ssd_guard.scoring.ssd import SSDScorer

    return SSDScorer.load("bundled", device="cpu")


def test_bundled_student_ships_its_risk_model(scorer) -> None:
    assert scorer.risk_model is not None
    assert set(scorer.risk_model.variants) == {"pre", "post", "post_gen"}
    for key in ("risk:pre", "risk:post", "risk:post_gen"):
        assert len(scorer.calibration[key]) > 100
    sig = scorer.prompt_signals(["What is the capital of France?", "Who won the 1911 pennant?"])
    assert all(0.0 < r < 1.0 for r in sig["risk"])
    # A question the small model knows is less risky than an obscure one.
    assert sig["risk"][0] < sig["risk"][1]


def test_guard_scores_and_caches_risk_at_both_scopes(scorer) -> None:
    cache = MemoryCache()
    guard = Guard(scorer, Policy.from_yaml_text(RISK_POLICY), cache=cache)
    with capture_decisions() as events:
        d = guard.check_prompt("What is the capital of France?")
        a = guard.check_answer("What is the capital of France?", "Paris")
        guard.check_prompt("What is the capital of France?")
    assert 0 < d.scores["risk"] < 1 and "entropy" in d.scores
    assert 0 < a.scores["risk"] < 1 and "pmi" in a.scores
    assert events[0]["scores"]["risk"] == pytest.approx(d.scores["risk"])
    assert events[2]["cache_hit"] is True
    assert events[2]["scores"]["risk"] == pytest.approx(d.scores["risk"])
    # The answer-scope quantile reads the post variant's validation values.
    thr = guard.policy.resolve_thresholds("risky-answer", guard._calibration("answer"))
    assert thr["risk.gt"] == pytest.approx(
        sorted(scorer.calibration["risk:post"])[
            int(0.95 * (len(scorer.calibration["risk:post"]) - 1))
        ],
        rel=0.05,
    )


def test_cached_entry_without_risk_is_recomputed(scorer) -> None:
    """An entry written by a guard whose policy did not read risk is a miss for one that
    does (never a silently missing score)."""
    cache = MemoryCache()
    plain = Guard(
        scorer,
        Policy.from_yaml_text(
            "name: e\nrules:\n  - {name: e, scope: prompt, when: {entropy: {gt: 99}}, "
            "action: abstain}\n"
        ),
        cache=cache,
    )
    plain.check_prompt("Who wrote Hamlet?")
    guard = Guard(scorer, Policy.from_yaml_text(RISK_POLICY), cache=cache)
    with capture_decisions() as events:
        d = guard.check_prompt("Who wrote Hamlet?")
    assert "risk" in d.scores and events[0]["cache_hit"] is False


def test_guarded_generation_feeds_its_token_statistics_to_risk(scorer) -> None:
    from ssd_guard.local import GuardedLocalModel
    from ssd_guard.scoring.token_stats import CALLSTATS_KEY

    guard = Guard(scorer, Policy.from_yaml_text(RISK_POLICY))
    local = GuardedLocalModel(guard, max_new_tokens=8)
    seen: list[object] = []
    original = scorer.answer_signals

    def spy(prompts, answers, *, formatted=False, hidden=None, stats=None, with_risk=False):  # type: ignore[no-untyped-def]
        seen.append(stats.get(CALLSTATS_KEY, answers[0][0]) if stats is not None else None)
        return original(
            prompts, answers, formatted=formatted, hidden=hidden, stats=stats, with_risk=with_risk
        )

    scorer.answer_signals = spy
    try:
        res = local.invoke("What is the capital of France?")
    finally:
        del scorer.answer_signals
    answer = next(d for d in res.decisions if d.scope == "answer")
    assert seen and seen[0] is not None
    lp_mean, lp_min, ent = seen[0]  # type: ignore[misc]
    assert lp_min <= lp_mean <= 0 and ent >= 0
    # The post_gen variant differs from the post one for the same text.
    post = scorer.answer_signals(["What is the capital of France?"], [res.output], with_risk=True)[
        "risk"
    ][0]
    assert answer.scores["risk"] != pytest.approx(post, abs=1e-9)


class _LengthScorer:
    """A pair scorer for the plumbing only (the real ones are tested in their own files)."""

    name = "Length"
    signal = "semgrad"

    def __init__(self) -> None:
        self.calibration = {"semgrad": [float(i) for i in range(1, 21)]}
        self.calls: list[tuple[list[str], list[str]]] = []

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> list[float]:
        self.calls.append((list(prompts), list(answers)))
        return [float(len(a)) for a in answers]


def test_pair_scorer_signals_reach_answer_rules(scorer) -> None:
    ps = _LengthScorer()
    policy = Policy.from_yaml_text(
        "name: p\nrules:\n  - {name: long, scope: answer, when: {semgrad: {gt_quantile: 0.5}}, "
        "action: reject_answer}\n"
    )
    guard = Guard(scorer, policy, pair_scorers=[ps])
    short = guard.check_answer("Capital of France?", "Paris")
    long = guard.check_answer("Capital of France?", "It is certainly the city of Paris, France")
    assert short.scores["semgrad"] == 5.0 and short.action == "allow"
    assert long.action == "reject_answer"
    assert len(ps.calls) == 2
    guard.check_answer("Capital of France?", "Paris")  # cached: not scored again
    assert len(ps.calls) == 2


def test_refusals(scorer, tmp_path: Path) -> None:
    from ssd_guard.scoring.risk import RiskModel

    policy = Policy.from_yaml_text(
        "name: p\nrules:\n  - {name: g, scope: answer, when: {draft_eu: {gt: 0.5}}, "
        "action: reject_answer}\n"
    )
    with pytest.raises(ConfigError, match="draft_eu"):
        Guard(scorer, policy)
    with pytest.raises(PolicyError, match="not available on scope 'prompt'"):
        Policy.from_yaml_text(
            "name: p\nrules:\n  - {name: g, scope: prompt, when: {semgrad: {gt: 0.5}}, "
            "action: abstain}\n"
        )
    with pytest.raises(PolicyError, match="not available on scope 'document'"):
        Policy.from_yaml_text(
            "name: p\nrules:\n  - {name: g, scope: document, when: {risk: {gt: 0.5}}, "
            "action: flag_poisoned}\n"
        )
    model = scorer.risk_model
    try:
        scorer.set_risk_model(None)
        with pytest.raises(ConfigError, match="fit-risk"):
            Guard(scorer, Policy.from_yaml_text(RISK_POLICY))
        other = RiskModel("0000000000000000", model.probes, model.variants, model.calibration)
        with pytest.raises(ArtifactMismatchError, match="fit-risk"):
            scorer.set_risk_model(other)
    finally:
        scorer.set_risk_model(model)
    assert "risk:pre" in scorer.calibration


def test_calibrated_risk_bound_resolves_from_its_own_file(scorer, tmp_path: Path) -> None:
    """`calibrate --signal risk` writes calibration-risk.json; a policy's calibrated risk
    bound resolves from it (not from the entropy file), and the guard acts on it."""
    import shutil

    import numpy as np

    from ssd_guard.artifact import bundled_artifact_path
    from ssd_guard.calibration import (
        CalibrationFile,
        calibration_filename,
        save_calibration,
    )
    from ssd_guard.policy import load_policy
    from ssd_guard.training.calibration import calibrate_threshold

    student = tmp_path / "student"
    shutil.copytree(bundled_artifact_path(), student)
    rng = np.random.default_rng(0)
    s = rng.random(2000)
    wrong = rng.random(2000) < s**2
    res = calibrate_threshold(s, wrong, alpha=0.2, delta=0.1, grid=np.linspace(0.05, 1, 20))
    cal = CalibrationFile.from_result(res, student_fingerprint=scorer.fingerprint, signal="risk")
    save_calibration(cal, student / calibration_filename("risk"))
    policy_path = tmp_path / "p.yaml"
    policy_path.write_text(
        "name: p\nstudent: student\nrules:\n  - name: guaranteed\n    scope: prompt\n"
        "    when: {risk: {calibrated: {max_error: 0.2, confidence: 0.9}}}\n"
        "    action: abstain\n",
        encoding="utf-8",
    )
    policy = load_policy(policy_path)
    assert policy.resolve_thresholds("guaranteed") == {"risk.gt": res.threshold}
    guard = Guard(scorer, policy)
    d = guard.check_prompt("What is the capital of France?")
    assert d.action == ("abstain" if d.scores["risk"] > res.threshold else "allow")


def test_shipped_calibrated_policy_routes_answer_retrieve_abstain(tmp_path: Path) -> None:
    """policies/calibrated.yaml resolves both calibrated regions from the bundled student's
    calibration-risk.json: answer below the first threshold, retrieve between, abstain
    beyond the second; check-policy prints both guarantees."""
    import shutil

    from ssd_guard.artifact import bundled_artifact_path
    from ssd_guard.calibration import load_calibration
    from ssd_guard.cli import main
    from ssd_guard.policy import load_policy

    root = ROOT
    policy = load_policy(root / "policies" / "calibrated.yaml")
    cal = load_calibration(bundled_artifact_path() / "calibration-risk.json")
    assert cal.abstain_threshold is not None and cal.abstain_threshold > cal.threshold
    assert policy.resolve_thresholds("surely-wrong") == {"risk.ge": cal.abstain_threshold}
    assert policy.resolve_thresholds("not-guaranteed") == {"risk.gt": cal.threshold}
    mid = (cal.threshold + cal.abstain_threshold) / 2
    actions = [
        policy.decide("prompt", {"risk": r, "entropy": 0.0}).action
        for r in (cal.threshold - 0.01, mid, cal.abstain_threshold + 0.001)
    ]
    assert actions == ["allow", "retrieve", "abstain"]
    assert main(["check-policy", str(root / "policies" / "calibrated.yaml")]) == 0

    # A stricter abstain target than the file guarantees, or a file with no abstain
    # threshold, is refused with what to re-run.
    student = tmp_path / "student"
    shutil.copytree(bundled_artifact_path(), student)
    text = (root / "policies" / "calibrated.yaml").read_text(encoding="utf-8")
    text = text.replace("student: bundled", "student: student")
    strict = tmp_path / "strict.yaml"
    strict.write_text(text.replace("abstain_max_right: 0.1", "abstain_max_right: 0.05"))
    with pytest.raises(PolicyError, match=r"--abstain-beta 0\.05"):
        load_policy(strict)
    one_sided = cal.model_copy(update={"abstain_threshold": None, "abstain_beta": None})
    (student / "calibration-risk.json").write_text(one_sided.model_dump_json())
    plain = tmp_path / "plain.yaml"
    plain.write_text(text)
    with pytest.raises(PolicyError, match="no abstain threshold"):
        load_policy(plain)
