"""``ssd-guard check-policy`` refuses what a policy names but
cannot be found, and checks several files in one call."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.paths import BAD_POLICIES as BAD
from helpers.paths import ROOT
from helpers.policy_cli import _fake_student, _run

from ssd_guard.errors import PolicyError
from ssd_guard.policy import Policy, check_policy_references, load_policy

DEFAULT = ROOT / "policies" / "default.yaml"


def _policy(tmp_path: Path, extra: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"name: p\n{extra}\nrules: []\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- item 9
def test_check_policy_refuses_a_student_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path, "student: students/nope")
    load_policy(path)  # the schema alone accepts it ...
    assert _run(["check-policy", str(path)]) == 1  # ... check-policy does not
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: student: student artifact not found")
    assert str(tmp_path / "students" / "nope") in err


def test_check_policy_refuses_a_directory_that_is_not_a_student(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    path = _policy(tmp_path, "student: empty")
    assert _run(["check-policy", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: student: " in err and "not a student artifact directory" in err
    assert "manifest.json" in err


def test_check_policy_refuses_an_unknown_proxy_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _policy(tmp_path, "proxy_model: acme/no-such-model-7b")
    assert _run(["check-policy", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: proxy_model: unknown model 'acme/no-such-model-7b'")
    assert "smollm2-135m-instruct" in err and "gemma3-270m" in err  # says what is known


def test_both_problems_are_reported_one_line_each(tmp_path: Path) -> None:
    path = _policy(tmp_path, "student: /nonexistent/student\nproxy_model: not-a-model")
    with pytest.raises(PolicyError) as info:
        check_policy_references(load_policy(path))
    lines = str(info.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["student", "proxy_model"]
    assert all(line.startswith(f"{path}: ") for line in lines)


@pytest.mark.parametrize(
    "proxy", ["smollm2-135m-instruct", "SmolLM2", "google/gemma-3-270m", "gemma3", "local-lm"]
)
def test_known_models_and_existing_students_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], proxy: str
) -> None:
    (tmp_path / "local-lm").mkdir()
    (tmp_path / "local-lm" / "config.json").write_text("{}")
    _fake_student(tmp_path / "students" / "mine")
    path = _policy(tmp_path, f"student: students/mine\nproxy_model: {proxy}")
    assert _run(["check-policy", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"student: students/mine, proxy model: {proxy}" in out


def test_relative_paths_are_found_beside_the_policy_or_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_student(tmp_path / "cwd" / "stu")
    policy_dir = tmp_path / "conf"
    policy_dir.mkdir()
    path = _policy(policy_dir, "student: stu")
    monkeypatch.chdir(tmp_path / "cwd")
    check_policy_references(load_policy(path))  # found in the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError, match="student artifact not found"):
        check_policy_references(load_policy(path))
    _fake_student(policy_dir / "stu")
    check_policy_references(load_policy(path))  # found beside the policy
    in_code = Policy(name="p", rules=[], student="conf/stu")
    check_policy_references(in_code)  # no file: relative to the working directory


def test_bundled_student_needs_no_lookup() -> None:
    check_policy_references(Policy(name="p", rules=[]))


# ---------------------------------------------------------------------------- item 19
def test_check_policy_accepts_several_files(capsys: pytest.CaptureFixture[str]) -> None:
    strict = ROOT / "policies" / "strict.yaml"
    assert _run(["check-policy", str(DEFAULT), str(strict)]) == 0
    captured = capsys.readouterr()
    assert f"==> {DEFAULT}: valid <==" in captured.out
    assert f"==> {strict}: valid <==" in captured.out
    assert "policy 'default'" in captured.out and "policy 'strict'" in captured.out
    assert captured.err == ""


def test_check_policy_reports_each_file_and_fails_if_any_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_type = BAD / "threshold_string.yaml"
    missing = tmp_path / "missing.yaml"
    no_student = _policy(tmp_path, "student: gone")
    files = [str(bad_type), str(DEFAULT), str(missing), str(no_student)]
    assert _run(["check-policy", *files]) == 1
    captured = capsys.readouterr()
    assert f"==> {DEFAULT}: valid <==" in captured.out  # the good one is still described
    assert "rule 'risky-prompt'" in captured.out
    err = captured.err.splitlines()
    assert err[0] == f"{bad_type}: rules[0].when.entropy.gt: expected a number, got a string"
    assert err[1] == f"{missing}: <root>: file not found"
    assert err[2].startswith(f"{no_student}: student: ")
    assert err[3] == "ssd-guard: 3 of 4 policies are invalid"


def test_check_policy_single_file_output_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["check-policy", str(DEFAULT)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy 'default'") and "==>" not in out
    assert _run(["check-policy", str(BAD / "huge_ttl.yaml")]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("cache.ttl_s: must be <= 315360000, got 100000000000000000000")
    )


def test_check_policy_needs_a_file() -> None:
    with pytest.raises(SystemExit):
        _run(["check-policy"])
