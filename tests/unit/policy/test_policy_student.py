"""The guard loads what the policy names.

``Guard(None, policy)`` and ``SSDGuard(policy=...)`` load the policy's ``student``
artifact (a path relative to the policy file), on its ``proxy_model`` when it names one;
then every event says ``hidden_state_source: proxy:<model>`` (a proxy's scores describe
the proxy, not the model that answers). A tiny artifact over the tiny random LM.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers.artifacts import LAYER, QUESTIONS, _build_artifact
from structlog.testing import capture_logs

from ssd_guard.artifact import load_artifact
from ssd_guard.cache import MemoryCache
from ssd_guard.errors import PolicyError
from ssd_guard.guard import Guard
from ssd_guard.integrations.langchain import SSDGuard
from ssd_guard.policy import load_policy
from ssd_guard.scoring.ssd import SSDScorer

POLICY = """
version: 1
name: names-its-student
student: {student}
proxy_model: {proxy}
default_action: allow
rules:
  - {{name: watch, scope: prompt, when: {{entropy: {{gt: -1000000000}}}}, action: log_only}}
"""


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory, tiny_lm) -> Path:
    root = tmp_path_factory.mktemp("policy-student")
    _build_artifact(root / "student", tiny_lm, layer=LAYER)
    return root


def _write_policy(root: Path, student: str, proxy: str | None) -> Path:
    path = root / f"policy-{abs(hash((student, proxy)))}.yaml"
    text = POLICY.format(student=student, proxy="null" if proxy is None else f"'{proxy}'")
    path.write_text(text)
    return path


def test_guard_without_scorer_loads_the_policy_student_on_its_proxy(
    artifact_dir: Path, tiny_lm_path: Path, tiny_lm
) -> None:
    policy_path = _write_policy(artifact_dir, "student", str(tiny_lm_path))  # relative student
    guard = Guard(None, policy_path, cache=MemoryCache())
    manifest, _ = load_artifact(artifact_dir / "student")
    assert isinstance(guard.scorer, SSDScorer)
    assert guard.scorer.fingerprint == manifest.fingerprint
    assert guard.scorer.model_fingerprint == tiny_lm.fingerprint  # the proxy's weights
    assert guard.hidden_state_source == f"proxy:{guard.scorer.model_id}"
    with capture_logs() as logs:
        d = guard.check_prompt(QUESTIONS[0])
    assert d.scores["entropy"] == pytest.approx(
        SSDScorer.load(
            artifact_dir / "student", lm=tiny_lm, embedder=guard.scorer.embedder.model
        ).score_prompts([QUESTIONS[0]])[0],
        abs=1e-4,
    )
    (event,) = [e for e in logs if e.get("event") == "guard.decision"]
    assert event["hidden_state_source"].startswith("proxy:")
    assert event["student_fingerprint"] == manifest.fingerprint


def test_without_proxy_the_student_base_model_is_loaded(artifact_dir: Path) -> None:
    policy_path = _write_policy(artifact_dir, "student", None)
    guard = Guard(None, policy_path, cache=MemoryCache())
    manifest, _ = load_artifact(artifact_dir / "student")
    assert guard.scorer.model_id == manifest.base_model.id
    assert guard.hidden_state_source == "scorer"


def test_ssdguard_without_scorer_loads_the_policy_student(
    artifact_dir: Path, tiny_lm_path: Path
) -> None:
    policy_path = _write_policy(artifact_dir, "student", str(tiny_lm_path))
    handler = SSDGuard(policy=policy_path, cache=MemoryCache())
    manifest, _ = load_artifact(artifact_dir / "student")
    assert handler.guard.scorer.fingerprint == manifest.fingerprint
    assert handler.guard.hidden_state_source.startswith("proxy:")


def test_an_absolute_student_path_works_from_anywhere(artifact_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(artifact_dir / "student", copy)
    guard = Guard(None, _write_policy(tmp_path, str(copy), None), cache=MemoryCache())
    assert guard.scorer.fingerprint == load_artifact(copy)[0].fingerprint


def test_a_missing_student_is_a_policy_error(tmp_path: Path) -> None:
    policy = load_policy(_write_policy(tmp_path, "no-such-student", None))
    with pytest.raises(PolicyError, match="student"):
        Guard(None, policy, cache=MemoryCache())
