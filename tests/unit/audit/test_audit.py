"""Audit events (structlog), summaries, replay and the check-policy / audit commands."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from helpers.fakes import AUDIT_CONTRACT_FIELDS
from helpers.paths import BAD_POLICIES as BAD
from helpers.paths import ROOT
from structlog.testing import capture_logs

from ssd_guard import audit
from ssd_guard.audit import (
    DECISION_EVENT,
    bind_run,
    close_audit,
    configure_audit,
    emit_decision,
    format_replay,
    format_summary,
    read_events,
    replay,
    summarise,
)
from ssd_guard.cli_runtime import add_commands
from ssd_guard.errors import PolicyError, SSDGuardError
from ssd_guard.policy import Policy


@pytest.fixture(autouse=True)
def _no_sink() -> Iterator[None]:
    close_audit()
    yield
    close_audit()


def _emit(**over: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "run_id": "run-1",
        "parent_run_id": None,
        "step": 1,
        "scope": "prompt",
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "hidden_state_source": "model",
        "student_fingerprint": "ab12cd34",
        "policy_name": "default",
        "policy_sha256": "f" * 64,
        "scores": {"entropy": 2.5},
        "thresholds": {"entropy.gt": 2.31},
        "rule": "risky-prompt",
        "action": "abstain",
        "cache_hit": False,
        "latency_ms": {"score": 4.2, "total": 5.0},
    }
    kwargs.update(over)
    return emit_decision(**kwargs)


# ---------------------------------------------------------------------------- emitting
def test_capture_logs_sees_exactly_one_decision_event_with_all_fields() -> None:
    with capture_logs() as logs:
        returned = _emit(tags=["medical"], source=None)
    decisions = [e for e in logs if e["event"] == DECISION_EVENT]
    assert len(decisions) == 1 and len(logs) == 1
    ev = decisions[0]
    assert AUDIT_CONTRACT_FIELDS | {"timestamp", "tags", "source"} <= set(ev)
    assert ev["scores"] == {"entropy": 2.5} and ev["thresholds"] == {"entropy.gt": 2.31}
    assert ev["rule"] == "risky-prompt" and ev["action"] == "abstain"
    assert ev["latency_ms"] == {"score": 4.2, "total": 5.0} and ev["cache_hit"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ev["timestamp"])
    assert returned["event"] == DECISION_EVENT and returned["timestamp"] == ev["timestamp"]


def test_capture_logs_still_works_with_a_sink(tmp_path: Path) -> None:
    configure_audit(tmp_path / "audit.jsonl")
    with capture_logs() as logs:
        _emit()
        _emit(step=2)
    assert [e["step"] for e in logs if e["event"] == DECISION_EVENT] == [1, 2]
    assert len(read_events(tmp_path / "audit.jsonl")) == 2


def test_file_sink_json_lines_with_bound_context(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    configure_audit(path, forward=False)
    with bind_run("run-7", parent_run_id="root", run_name="agent-x"):
        _emit(run_id="run-7", parent_run_id="root")
        with bind_run("run-8", parent_run_id="run-7"):
            _emit(run_id="run-8", parent_run_id="run-7", step=2)
    _emit(step=3)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    events = [json.loads(line) for line in lines]
    assert all(list(e)[:2] == ["event", "timestamp"] for e in events)
    assert events[0]["run_name"] == "agent-x" and events[1]["run_name"] == "agent-x"
    assert "run_name" not in events[2]  # context is restored after bind_run
    assert events[1]["parent_run_id"] == "run-7"
    assert set(events[2]) >= AUDIT_CONTRACT_FIELDS
    assert structlog.contextvars.get_contextvars() == {}


def test_configure_audit_is_idempotent_and_switchable(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    configure_audit(a, forward=False)
    configure_audit(a, forward=False)
    configure_audit(str(a), forward=False)
    _emit()
    assert len(a.read_text().splitlines()) == 1  # not one line per configure call
    configure_audit(b, forward=False)
    _emit()
    assert len(a.read_text().splitlines()) == 1 and len(b.read_text().splitlines()) == 1


def test_stream_sink_and_file_together(tmp_path: Path) -> None:
    buf = io.StringIO()
    configure_audit(tmp_path / "x.jsonl", stream=buf, forward=False)
    _emit()
    assert json.loads(buf.getvalue())["event"] == DECISION_EVENT
    assert (tmp_path / "x.jsonl").read_text() == buf.getvalue()


def test_does_not_touch_global_structlog_config(tmp_path: Path) -> None:
    before = structlog.get_config()
    configured = structlog.is_configured()
    configure_audit(tmp_path / "x.jsonl")
    _emit()
    after = structlog.get_config()
    assert structlog.is_configured() == configured
    assert after["processors"] == before["processors"]
    assert after["logger_factory"] is before["logger_factory"]
    assert after["wrapper_class"] is before["wrapper_class"]


def test_non_finite_numbers_are_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    configure_audit(path, forward=False)
    _emit(
        scope="answer",
        scores={"entropy": float("nan"), "loglik": -math.inf},
        thresholds={"loglik.lt": -40.0},
        weird=float("inf"),
    )
    line = path.read_text()
    assert "NaN" not in line and "Infinity" not in line
    raw = json.loads(line)
    assert raw["scores"] == {"entropy": None, "loglik": "-inf"} and raw["weird"] == "inf"
    ev = read_events(path)[0]
    assert ev["scores"]["loglik"] == -math.inf


def test_closed_stream_does_not_crash_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    configure_audit(stream=buf, forward=False)
    buf.close()
    _emit()
    assert "audit write failed" in capsys.readouterr().err


# ---------------------------------------------------------------------------- reading
def _event(
    run: str,
    step: int,
    scope: str,
    action: str,
    rule: str | None,
    scores: dict[str, Any],
    *,
    ts: str,
    total: float,
    hit: bool = False,
    parent: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "event": DECISION_EVENT,
        "timestamp": ts,
        "run_id": run,
        "parent_run_id": parent,
        "step": step,
        "scope": scope,
        "model_id": "m",
        "hidden_state_source": "model",
        "student_fingerprint": "fp",
        "policy_name": "default",
        "policy_sha256": "0" * 64,
        "scores": scores,
        "thresholds": {},
        "rule": rule,
        "action": action,
        "cache_hit": hit,
        "latency_ms": {"score": total * 0.8, "total": total},
        **extra,
    }


EVENTS = [
    _event("r1", 1, "prompt", "allow", None, {"entropy": 1.0}, ts="2025-01-01T10:00:00Z", total=3),
    _event("r1", 2, "answer", "reject_answer", "unlikely", {"entropy": 1.0, "loglik": -80.0},
           ts="2025-01-01T10:00:05Z", total=9),
    _event("r1", 3, "document", "flag_poisoned", "poison", {"entropy": 1.0, "loglik": -95.0},
           ts="2025-01-01T10:00:06Z", total=4, source="retrieval"),
    _event("r2", 1, "prompt", "abstain", "risky", {"entropy": 7.5}, ts="2025-01-02T09:00:00Z",
           total=30, hit=True, tags=["medical"]),
    _event("r3", 1, "prompt", "allow", None, {"entropy": 2.0}, ts="2025-01-03T09:00:00Z",
           total=1, hit=True, parent="r2", run_name="sub-agent"),
    _event("r3", 2, "answer", "allow", None, {"entropy": 2.0, "loglik": None},
           ts="2025-01-03T09:00:01Z", total=2, parent="r2", missing_scores=["loglik"]),
]  # fmt: skip


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    lines = [json.dumps(e) for e in EVENTS]
    lines.insert(2, json.dumps({"event": "cache.redis.unavailable", "timestamp": "x"}))
    lines.insert(4, "")
    lines.append('{"event": "guard.decision", "trunc')  # a crash mid-write
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_events(log_file: Path) -> None:
    with capture_logs() as logs:
        events = read_events(log_file)
    assert [(e["run_id"], e["step"]) for e in events] == [(e["run_id"], e["step"]) for e in EVENTS]
    assert [e["event"] for e in logs] == ["audit.read.skipped_lines"]
    assert len(read_events(log_file, event=None)) == 7
    with pytest.raises(SSDGuardError, match=r"audit\.jsonl:9: not a JSON event"):
        read_events(log_file, strict=True)
    with pytest.raises(SSDGuardError, match="cannot read"):
        read_events(log_file.parent / "missing.jsonl")


def test_summarise_counts_and_stats(log_file: Path) -> None:
    s = summarise(read_events(log_file))
    assert s["events"] == 6 and s["runs"] == 2  # r3 is a sub-run of r2
    assert s["by_action"] == {
        "allow": 3, "reject_answer": 1, "flag_poisoned": 1, "abstain": 1,
    }  # fmt: skip
    assert s["by_rule"]["(default)"] == 3 and s["by_rule"]["risky"] == 1
    assert s["by_scope"] == {"prompt": 3, "answer": 2, "document": 1}
    assert s["blocked"] == 2
    assert s["cache"] == {"hits": 2, "misses": 4, "hit_rate": pytest.approx(2 / 6)}
    assert s["missing_scores"] == 2  # the null loglik + its missing_scores entry
    ent = s["scores"]["entropy"]
    assert ent["count"] == 6 and ent["min"] == 1.0 and ent["max"] == 7.5
    assert ent["mean"] == pytest.approx((1 + 1 + 1 + 7.5 + 2 + 2) / 6)
    assert s["scores"]["loglik"]["count"] == 2
    hist = ent["histogram"].splitlines()
    assert len(hist) == 10 and sum(int(line.split()[-1]) for line in hist) == 6
    assert "#" in hist[0]
    assert [r["total_ms"] for r in s["slowest"]] == [30, 9, 4, 3, 2]
    assert s["slowest"][0]["run_id"] == "r2"
    assert s["latency_ms"]["total"]["max"] == 30
    assert (s["first"], s["last"]) == ("2025-01-01T10:00:00Z", "2025-01-03T09:00:01Z")


def test_summarise_filters(log_file: Path) -> None:
    events = read_events(log_file)
    assert summarise(events, run_id="r1")["events"] == 3
    assert summarise(events, run_id="r2")["events"] == 3  # includes its sub-run r3
    assert summarise(events, run_id="r3")["events"] == 2
    assert summarise(events, action="allow")["by_action"] == {"allow": 3}
    assert summarise(events, since="2025-01-02T00:00:00Z")["events"] == 3
    assert summarise(events, until="2025-01-01T10:00:05")["events"] == 2  # naive = UTC
    assert summarise(events, since="2025-01-01T10:00:01Z", until="2025-01-02")["events"] == 2
    empty = summarise(events, action="retrieve")
    assert empty["events"] == 0 and empty["slowest"] == [] and empty["scores"] == {}
    assert format_summary(empty).startswith("0 decisions in 0 runs")
    with pytest.raises(SSDGuardError, match="ISO-8601"):
        summarise(events, since="yesterday")


def test_format_summary(log_file: Path) -> None:
    text = format_summary(summarise(read_events(log_file), run_id="r1"))
    assert text.splitlines()[0] == (
        "3 decisions in 1 runs, 2025-01-01T10:00:00Z .. 2025-01-01T10:00:06Z"
    )
    assert "filters: run_id=r1" in text
    assert re.search(r"reject_answer\s+1\s+33\.3 %", text)
    assert "entropy: n=3" in text and "slowest steps:" in text
    assert "9.00 ms  run r1 step 2 answer -> reject_answer (unlikely)" in text


REPLAY_POLICY = """
name: stricter
rules:
  - {name: risky, scope: prompt, when: {entropy: {gt: 1.5}}, action: abstain}
  - name: medical
    scope: prompt
    tags: [medical]
    action: log_only
  - {name: unlikely, scope: answer, when: {loglik: {lt: -50}}, action: reject_answer}
  - {name: tool-only, scope: document, sources: [tool], action: flag_poisoned}
"""


def test_replay_reports_changes_without_a_model(log_file: Path) -> None:
    policy = Policy.from_yaml_text(REPLAY_POLICY)
    rows = replay(policy, read_events(log_file))
    assert len(rows) == 6
    got = [(r.run_id, r.step, r.old_action, r.new_action, r.new_rule) for r in rows]
    assert got == [
        ("r1", 1, "allow", "allow", None),
        ("r1", 2, "reject_answer", "reject_answer", "unlikely"),
        ("r1", 3, "flag_poisoned", "allow", None),  # logged source is retrieval, not tool
        ("r2", 1, "abstain", "abstain", "risky"),
        ("r3", 1, "allow", "abstain", "risky"),
        ("r3", 2, "allow", "allow", None),
    ]
    assert [r.changed for r in rows] == [False, False, True, False, True, False]
    assert rows[4].new_thresholds == {"entropy.gt": 1.5}
    assert rows[5].missing_scores == ("loglik",)  # the logged loglik was null
    text = format_replay(rows, policy.name)
    assert text.startswith("replayed 6 decisions under policy 'stricter': 2 changed")
    assert "allow -> abstain" in text and "run r3 step 1 prompt: allow (default)" in text


def test_replay_uses_logged_tags() -> None:
    policy = Policy.from_yaml_text(REPLAY_POLICY.replace("risky, scope", "zz, scope"))
    ev = _event("r", 1, "prompt", "allow", None, {"entropy": 1.0}, ts="2025-01-01T00:00:00Z",
                total=1, tags=["medical"])  # fmt: skip
    (row,) = replay(policy, [ev])
    assert (row.new_action, row.new_rule) == ("log_only", "medical")


def test_replay_with_quantiles_needs_calibration(log_file: Path) -> None:
    policy = Policy.from_yaml_text(
        "name: q\nrules:\n  - {name: q, scope: prompt, when: {entropy: {gt_quantile: 0.5}}, "
        "action: abstain}\n"
    )
    with pytest.raises(PolicyError, match="rule 'q'"):
        replay(policy, read_events(log_file))
    rows = replay(policy, read_events(log_file), calibration={"entropy": [0.0, 4.0]})
    assert [r.new_action for r in rows if r.scope == "prompt"] == ["allow", "abstain", "allow"]


# ---------------------------------------------------------------------------- CLI
def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ssd-guard")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SSDGuardError as exc:  # what ssd_guard.cli.main does
        print(f"ssd-guard: error: {exc}", file=__import__("sys").stderr)
        return 1


def test_cli_check_policy_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["check-policy", str(ROOT / "policies" / "default.yaml")]) == 0
    out = capsys.readouterr().out
    assert "rule 'risky-prompt': before generation" in out


def test_cli_check_policy_with_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"entropy": list(range(101)), "loglik": list(range(-100, 1))}))
    policy = tmp_path / "quantile.yaml"
    policy.write_text(
        "name: q\nrules:\n  - name: risky\n    scope: prompt\n"
        "    when: {entropy: {gt_quantile: 0.9}}\n    action: abstain\n"
    )
    assert _run(["check-policy", str(policy), "--calibration", str(cal)]) == 0
    assert "(the riskiest 10 %; = 90)" in capsys.readouterr().out


def test_cli_check_policy_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    bad = BAD / "threshold_string.yaml"
    assert _run(["check-policy", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.strip() == f"{bad}: rules[0].when.entropy.gt: expected a number, got a string"
    )


def test_cli_via_main(capsys: pytest.CaptureFixture[str]) -> None:
    from ssd_guard.cli import main

    assert main(["check-policy", str(BAD / "empty.yaml")]) == 1
    assert "<root>: the file is empty" in capsys.readouterr().err


def test_cli_audit_summary_text_and_json(
    log_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["audit", str(log_file), "--run", "r1"]) == 0
    assert capsys.readouterr().out.startswith("3 decisions in 1 runs")
    assert (
        _run(["audit", str(log_file), "--action", "allow", "--since", "2025-01-02", "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["events"] == 2 and data["by_action"] == {"allow": 2}


def test_cli_audit_replay(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pol = tmp_path / "stricter.yaml"
    pol.write_text(REPLAY_POLICY)
    assert _run(["audit", str(log_file), "--replay", str(pol)]) == 0
    assert "2 changed" in capsys.readouterr().out
    assert _run(["audit", str(log_file), "--replay", str(pol), "--run", "r3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["decisions"] == 2 and data["changed"] == 1
    assert data["rows"][0]["new_action"] == "abstain" and data["rows"][0]["changed"] is True


def test_cli_audit_replay_quantiles(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cal = tmp_path / "cal.json"
    cal.write_text(
        json.dumps(
            {"calibration": {"entropy": [0.0, 4.0], "loglik": [-100.0, 0.0], "pmi": [-9.0, 9.0]}}
        )
    )
    policy = str(ROOT / "policies" / "default.yaml")
    assert (
        _run(["audit", str(log_file), "--replay", policy, "--calibration", str(cal), "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "default" and data["decisions"] == 6
    bad_cal = tmp_path / "bad.json"
    bad_cal.write_text('{"entropy": "x"}')
    assert _run(["audit", str(log_file), "--replay", policy, "--calibration", str(bad_cal)]) == 1
    assert "lists of numbers" in capsys.readouterr().err


def test_audit_module_surface() -> None:
    assert set(audit.__all__) >= {
        "bind_run", "configure_audit", "emit_decision", "read_events", "replay", "summarise",
        "format_summary", "ReplayRow",
    }  # fmt: skip
