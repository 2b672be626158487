"""``ssd-guard score``: every signal (entropy, risk, loglik, pmi, consensus) and, for the
policy in use, each rule's resolved thresholds and the decision it would take."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.fakes import FakeScorer

from ssd_guard.cli import main
from ssd_guard.cli_engine import score_report
from ssd_guard.policy import Policy, load_default_policy

POLICY = """
name: score-test
rules:
  - name: risky
    scope: prompt
    when: {risk: {gt: 0.7}}
    action: abstain
  - name: uncertain
    scope: prompt
    when: {entropy: {gt_quantile: 0.5}}
    action: retrieve
  - name: unlikely
    scope: answer
    when: {pmi: {lt: -5}}
    action: reject_answer
"""


class RiskFake(FakeScorer):
    """A fake with a risk model: ``prompt_signals`` / ``answer_signals(with_risk=True)``
    add ``risk`` as the SSD scorer does; pmi and consensus differ from loglik."""

    risk_model = object()

    def prompt_signals(self, prompts: Sequence[str]) -> dict[str, list[float]]:
        return {
            "entropy": self.score_prompts(prompts),
            "risk": [0.9 if "?" in p else 0.1 for p in prompts],
        }

    def answer_signals(  # type: ignore[override]
        self, prompts: Sequence[str], answers: Sequence[str], *, with_risk: bool = False
    ) -> dict[str, Any]:
        ll = self.score_answers(prompts, answers)
        out = {"loglik": ll, "pmi": [v - 1 for v in ll], "consensus": [v - 2 for v in ll]}
        if with_risk:
            out["risk"] = [0.25 for _ in ll]
        return out


def scorer() -> RiskFake:
    return RiskFake(entropy={"hard?": 2.5, "easy": 0.2}, loglik={"bad": -9.0, "ok": -1.0})


def test_report_has_every_signal_and_each_rules_thresholds_and_decision() -> None:
    policy = Policy.from_yaml_text(POLICY)
    s = scorer()  # calibration: entropy 0.0 .. 3.0
    (hard, easy) = score_report(s, policy, ["hard?", "easy"], ["bad", "ok"])
    assert hard["entropy"] == 2.5 and hard["risk"] == 0.9
    assert (hard["answer_loglik"], hard["answer_pmi"], hard["answer_consensus"]) == (-9, -10, -11)
    assert hard["answer_risk"] == 0.25 and hard["answer"] == "bad"
    pre = hard["policy"]["prompt"]
    assert pre["action"] == "abstain" and pre["rule"] == "risky"
    assert pre["rules"] == [
        {"rule": "risky", "thresholds": {"risk.gt": 0.7}, "action": "abstain"},
        {"rule": "uncertain", "thresholds": {"entropy.gt": 1.5}, "action": "retrieve"},
    ]
    assert hard["policy"]["answer"]["rules"] == [
        {"rule": "unlikely", "thresholds": {"pmi.lt": -5.0}, "action": "reject_answer"}
    ]
    assert easy["policy"]["prompt"]["action"] == "allow"
    assert [r["action"] for r in easy["policy"]["prompt"]["rules"]] == [None, None]
    assert easy["policy"]["answer"]["action"] == "allow"
    assert hard["policy"]["name"] == "score-test"


def test_report_without_answers_or_risk_model() -> None:
    policy = Policy.from_yaml_text(
        "name: no-risk\nrules:\n  - name: uncertain\n    scope: prompt\n"
        "    when: {entropy: {gt: 1.5}}\n    action: retrieve\n"
    )
    (row,) = score_report(FakeScorer(default_entropy=0.4, risk=False), policy, ["q"])
    assert "risk" not in row and "answer_loglik" not in row and "answer" not in row["policy"]
    assert row["entropy"] == 0.4 and row["policy"]["prompt"]["action"] is not None
    assert all("thresholds" in r for r in row["policy"]["prompt"]["rules"])


def test_score_command_prints_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssd_guard.scoring import ssd

    monkeypatch.setattr(ssd.SSDScorer, "load", classmethod(lambda cls, *a, **k: scorer()))
    path = tmp_path / "p.yaml"
    path.write_text(POLICY, encoding="utf-8")
    assert main(["score", "hard?", "--answer", "ok", "--policy", str(path)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert set(row) >= {"entropy", "risk", "answer_loglik", "answer_pmi", "answer_consensus"}
    assert row["policy"]["source"] == str(path) and row["policy"]["answer"]["action"] == "allow"
    assert main(["score", "easy"]) == 0  # the default policy
    (row,) = json.loads(capsys.readouterr().out)
    assert row["policy"]["name"] == load_default_policy().name
    assert main(["score", "a", "b", "--answer", "x"]) == 2
