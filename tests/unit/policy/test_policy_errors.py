"""Policies are refused alike everywhere, with every error of a file at once:
``Guard(scorer, policy)`` refuses a missing ``student`` / ``proxy_model`` as
``ssd-guard check-policy`` does; ``check-policy`` and :class:`PolicyError` list all the
problems of a file (a duplicate rule name beside a broken rule); a calibrated guarantee
shared by several rules is printed once."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.guard import make_scorer
from helpers.policy_cli import _fake_student, _run

from ssd_guard.errors import PolicyError
from ssd_guard.guard import Guard
from ssd_guard.policy import Policy, check_policy_file, describe_policy, load_policy

RULES = """rules:
  - name: a
    scope: prompt
    when: {entropy: {gt: 2}}
    action: abstain
"""


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- item 5
@pytest.mark.parametrize(
    ("header", "key"),
    [("student: students/nope", "student"), ("proxy_model: no-such/model-xyz", "proxy_model")],
)
def test_guard_with_a_scorer_refuses_what_check_policy_refuses(
    tmp_path: Path, header: str, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"name: p\n{header}\n{RULES}")
    with pytest.raises(PolicyError) as info:
        Guard(make_scorer(), path)  # a path ...
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert info.value.key_path == key  # type: ignore[attr-defined]
    with pytest.raises(PolicyError, match=f"^{path}: {key}: "):
        Guard(make_scorer(), load_policy(path))  # ... or a loaded policy
    assert _run(["check-policy", str(path)]) == 1
    assert capsys.readouterr().err.startswith(f"{path}: {key}: ")


def test_guard_accepts_bundled_and_an_existing_student(tmp_path: Path) -> None:
    Guard(make_scorer(), _write(tmp_path, f"name: p\nstudent: bundled\n{RULES}"))
    _fake_student(tmp_path / "students" / "mine")
    path = _write(tmp_path, f"name: p\nstudent: students/mine\n{RULES}", "mine.yaml")
    guard = Guard(make_scorer(), path)  # relative to the policy file
    assert guard.check_prompt("q").action in ("allow", "abstain")
    Guard(make_scorer(), Policy.from_yaml_text(f"name: p\nproxy_model: smollm2\n{RULES}"))


# ---------------------------------------------------------------------------- item 6
BROKEN = """name: p
student: students/nope
rules:
  - name: dup
    scope: prompt
    when: {entropy: {gt: 2}}
    action: abstain
  - name: wrong-scope
    scope: prompt
    when: {entropy: {gt: 1}}
    action: reject_answer
    k: 3
  - name: dup
    scope: answer
    when: {loglik: {lt: -8}}
    action: reject_answer
"""


def test_every_error_of_a_file_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, BROKEN)
    want = [
        ("rules[1].action", "action 'reject_answer' does not apply to scope 'prompt'"),
        ("rules[1].k", "only applies to action retrieve"),
        ("rules[2].name", "duplicate rule name 'dup' (already used by rules[0])"),
    ]
    with pytest.raises(PolicyError) as info:
        load_policy(path)  # the schema's errors: all of them
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    for line, (key, reason) in zip(lines, want, strict=True):
        assert line.startswith(f"{path}: {key}: {reason}")
    assert [k for k, _ in info.value.problems] == [k for k, _ in want]  # type: ignore[attr-defined]

    with pytest.raises(PolicyError) as info:
        check_policy_file(path)  # ... and the missing student with them
    keys = [k for k, _ in info.value.problems]  # type: ignore[attr-defined]
    assert keys == [*(k for k, _ in want), "student"]

    assert _run(["check-policy", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith(f"{path}: ") for line in err)
    assert err[-1].startswith(f"{path}: student: student artifact not found")


def test_policy_level_errors_are_reported_together() -> None:
    text = "version: 9\nname: p\ndefault_action: reject_answer\n" + RULES + RULES[7:]
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(text, "x.yaml")
    keys = [k for k, _ in info.value.problems]  # type: ignore[attr-defined]
    assert keys == ["version", "default_action", "rules[1].name"]


def test_a_valid_file_passes_check_policy_file(tmp_path: Path) -> None:
    policy = check_policy_file(_write(tmp_path, f"name: p\n{RULES}"))
    assert policy.rules[0].name == "a"


# ---------------------------------------------------------------------------- item 7
def test_a_shared_calibrated_guarantee_is_printed_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.calibration import _student_with_calibration

    _student_with_calibration(tmp_path)
    bound = "{entropy: {calibrated: {max_error: 0.2, confidence: 0.9}}}"
    path = _write(
        tmp_path,
        "name: p\nstudent: student\nrules:\n"
        f"  - name: first\n    scope: prompt\n    when: {bound}\n    action: abstain\n"
        f"  - name: second\n    scope: answer\n    when: {bound}\n    action: reject_answer\n",
    )
    text = describe_policy(load_policy(path))
    assert text.count("exchangeable") == 1  # the guarantee's text, once
    rules = [line for line in text.splitlines() if line.startswith("rule ")]
    assert all("[calibrated guarantee 1]" in line for line in rules)
    assert text.splitlines()[-1].startswith("calibrated guarantee 1: The guard answers when")
    assert _run(["check-policy", str(path)]) == 0
    assert capsys.readouterr().out.count("exchangeable") == 1
