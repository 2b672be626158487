"""With no configuration, audit events are JSON lines on stderr (or in
``$SSD_GUARD_AUDIT_LOG``), never coloured console lines on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers.fakes import AUDIT_CONTRACT_FIELDS
from helpers.paths import ROOT
from structlog.testing import capture_logs

from ssd_guard.audit import (
    AUDIT_LOG_ENV,
    DECISION_EVENT,
    close_audit,
    configure_audit,
    emit_decision,
    read_events,
)


@pytest.fixture(autouse=True)
def _unconfigured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No audit sink, no structlog configuration, no env var: a fresh program."""
    was_configured = structlog.is_configured()
    before = structlog.get_config()
    structlog.reset_defaults()
    monkeypatch.delenv(AUDIT_LOG_ENV, raising=False)
    close_audit()
    yield
    close_audit()
    if was_configured:
        structlog.configure(**before)
    else:
        structlog.reset_defaults()


def _emit(**over: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "run_id": "run-1",
        "parent_run_id": None,
        "step": 1,
        "scope": "prompt",
        "model_id": "m",
        "hidden_state_source": "model",
        "student_fingerprint": "fp",
        "policy_name": "default",
        "policy_sha256": "f" * 64,
        "scores": {"entropy": 2.5},
        "thresholds": {"entropy.gt": 2.31},
        "rule": "risky-prompt",
        "action": "abstain",
        "cache_hit": False,
        "latency_ms": {"total": 5.0},
    }
    kwargs.update(over)
    return emit_decision(**kwargs)


def test_default_is_json_lines_on_stderr_and_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not structlog.is_configured()
    _emit()
    _emit(step=2)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2 and "\x1b[" not in captured.err  # no ANSI colours
    events = [json.loads(line) for line in lines]
    assert [e["step"] for e in events] == [1, 2]
    assert all(e["event"] == DECISION_EVENT for e in events)
    assert set(events[0]) >= AUDIT_CONTRACT_FIELDS


def test_env_var_names_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    monkeypatch.setenv(AUDIT_LOG_ENV, str(path))
    _emit()
    _emit(step=2)
    assert capsys.readouterr() == ("", "")
    assert [e["step"] for e in read_events(path)] == [1, 2]
    other = tmp_path / "other.jsonl"
    monkeypatch.setenv(AUDIT_LOG_ENV, str(other))  # followed when it changes
    _emit(step=3)
    assert [e["step"] for e in read_events(other)] == [3]


def test_env_var_that_cannot_be_opened_falls_back_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(AUDIT_LOG_ENV, str(tmp_path))  # a directory
    _emit()
    captured = capsys.readouterr()
    assert captured.out == ""
    note, line = captured.err.splitlines()
    assert note.startswith(f"ssd-guard: cannot open ${AUDIT_LOG_ENV}=")
    assert json.loads(line)["event"] == DECISION_EVENT


def test_an_application_that_configured_structlog_gets_the_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with capture_logs() as logs:
        _emit()
    assert [e["event"] for e in logs] == [DECISION_EVENT]
    assert capsys.readouterr() == ("", "")  # not written twice


def test_configure_audit_without_arguments_follows_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_audit()
    _emit()
    captured = capsys.readouterr()  # capsys swapped sys.stderr after configure_audit
    assert captured.out == "" and json.loads(captured.err)["step"] == 1


def test_explicit_file_sink_still_wins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure_audit(tmp_path / "a.jsonl")
    _emit()
    assert capsys.readouterr() == ("", "")
    assert len(read_events(tmp_path / "a.jsonl")) == 1


def test_a_fresh_program_prints_json_to_stderr_only(tmp_path: Path) -> None:
    code = (
        "from ssd_guard.audit import emit_decision\n"
        "emit_decision(run_id='r', parent_run_id=None, step=1, scope='prompt', model_id='m',"
        " hidden_state_source='model', student_fingerprint='fp', policy_name='p',"
        " policy_sha256='0', scores={'entropy': 1.0}, thresholds={}, rule=None,"
        " action='allow', cache_hit=None, latency_ms={'total': 1.0})\n"
        "print('program output')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != AUDIT_LOG_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FORCE_COLOR"] = "1"  # structlog's console renderer would colour; we must not use it
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "program output\n"
    event = json.loads(proc.stderr.strip().splitlines()[-1])
    assert event["event"] == DECISION_EVENT and event["run_id"] == "r"


def test_audit_docs_say_where_events_go() -> None:
    section = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    assert "stderr" in section and AUDIT_LOG_ENV in section and "JSON" in section
