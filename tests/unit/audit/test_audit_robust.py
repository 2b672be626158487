"""``ssd-guard audit`` never prints a traceback. Bad lines (bytes that
are not UTF-8, a torn last line, fields of the wrong shape) are skipped and counted; a
closed pipe ends the command quietly."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.audit_logs import _event, _line, _run, _write_log
from helpers.paths import ROOT

from ssd_guard.audit import (
    event_problem,
    read_events,
    replay,
    scan_events,
    summarise,
)
from ssd_guard.errors import SSDGuardError
from ssd_guard.policy import Policy

POLICY = """
name: replayed
rules:
  - {name: risky, scope: prompt, when: {entropy: {gt: 1.5}}, action: abstain}
  - {name: medical, scope: prompt, tags: [medical], run_names: ["agent-*"], action: log_only}
"""


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "replayed.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- bytes
def test_a_non_utf8_byte_costs_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        _line(_event(1)),
        b'{"event": "guard.decision", "run_id": "caf\xe9"}',
        _line(_event(2)),
    ]
    log = _write_log(tmp_path / "audit.jsonl", lines)
    assert _run(["audit", str(log), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["events"] == 2 and data["skipped_lines"] == 1
    assert "skipped 1 bad line(s)" in captured.err and "line 2: not UTF-8" in captured.err
    assert "Traceback" not in captured.err


def test_a_last_line_torn_inside_a_multibyte_character(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last = _line(_event(3, run_name="é" * 3))
    cut = last.index("é".encode()) + 1  # inside the two bytes of "é"
    log = _write_log(
        tmp_path / "audit.jsonl", [_line(_event(1)), _line(_event(2)), last[:cut]],
        newline_at_end=False,
    )  # fmt: skip
    with pytest.raises(UnicodeDecodeError):
        log.read_text(encoding="utf-8")  # what crashed the old reader
    assert _run(["audit", str(log)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("2 decisions in 1 runs")
    assert "skipped 1 bad line(s)" in captured.err and "line 3: not UTF-8" in captured.err
    scan = scan_events(log)
    assert (len(scan.events), scan.skipped) == (2, 1)
    assert scan.problems[0][0] == 3


def test_a_line_separator_inside_a_string_does_not_split_the_line(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1, run_name="a\u2028b\x85c"))])
    scan = scan_events(log)
    assert scan.skipped == 0 and scan.events[0]["run_name"] == "a\u2028b\x85c"


def test_lone_surrogates_are_escaped_not_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = json.dumps(_event(1, run_id="\udc80", action="allow\ud800")).encode()
    log = _write_log(tmp_path / "audit.jsonl", [line])
    assert _run(["audit", str(log)]) == 0
    out = capsys.readouterr().out
    assert "allow\\ud800" in out  # backslash-escaped on a UTF-8 stdout


def test_binary_and_text_streams(tmp_path: Path) -> None:
    raw = b"\n".join([_line(_event(1)), b"\xff\xfe", _line(_event(2))]) + b"\n"
    assert len(read_events(io.BytesIO(raw))) == 2
    text = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")  # like sys.stdin
    scan = scan_events(text)
    assert [e["step"] for e in scan.events] == [1, 2] and scan.skipped == 1
    assert text.errors == "strict"  # the stream's setting is restored
    assert scan_events(io.StringIO(raw.decode("utf-8", "replace"))).skipped == 1


# ---------------------------------------------------------------------------- shapes
BAD_SHAPES: list[tuple[dict[str, Any], str]] = [
    ({"scores": 5}, "scores is not an object (got a number)"),
    ({"scores": [1.0, 2.0]}, "scores is not an object (got a list)"),
    ({"latency_ms": "fast"}, "latency_ms is not an object (got a string)"),
    ({"thresholds": True}, "thresholds is not an object (got a boolean)"),
    ({"latency_ms": {"total": 10**400}}, "latency_ms.total is out of range"),
    ({"tags": 5}, "tags is not a list of strings (got a number)"),
    ({"tags": ["ok", 5]}, "tags is not a list of strings (got a list)"),
    ({"run_name": 7}, "run_name is not a string (got a number)"),
    ({"source": {"x": 1}}, "source is not a string (got an object)"),
    ({"timestamp": 5}, "timestamp is not a string (got a number)"),
    ({"rule": ["r"]}, "rule is not a string (got a list)"),
    ({"run_id": {"a": 1}}, "run_id is not a string or number (got an object)"),
    ({"missing_scores": 3}, "missing_scores is not a list (got a number)"),
]


@pytest.mark.parametrize(("over", "reason"), BAD_SHAPES, ids=[r for _, r in BAD_SHAPES])
def test_fields_of_the_wrong_shape_are_skipped_and_counted(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    policy_file: Path,
    over: dict[str, Any],
    reason: str,
) -> None:
    bad = _event(2, **over)
    assert event_problem(bad) == reason
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1)), _line(bad), _line(_event(3))])
    assert _run(["audit", str(log), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["events"] == 2 and summary["skipped_lines"] == 1
    assert f"line 2: {reason}" in captured.err
    assert _run(["audit", str(log), "--replay", str(policy_file), "--json"]) == 0
    captured = capsys.readouterr()
    replayed = json.loads(captured.out)
    assert replayed["decisions"] == 2 and replayed["skipped_lines"] == 1
    assert [row["step"] for row in replayed["rows"]] == [1, 3]
    assert "Traceback" not in captured.err


def test_replay_on_tags_5_and_run_name_7_text_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy_file: Path
) -> None:
    lines = [_line(_event(1)), _line(_event(2, tags=5)), _line(_event(3, run_name=7))]
    log = _write_log(tmp_path / "audit.jsonl", lines)
    assert _run(["audit", str(log), "--replay", str(policy_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("replayed 1 decisions under policy 'replayed'")
    assert "skipped 2 bad line(s)" in captured.err
    assert "line 2: tags is not" in captured.err and "line 3: run_name is not" in captured.err


def test_library_readers_skip_malformed_events_given_in_memory() -> None:
    events: list[Any] = [_event(1), _event(2, tags=5), _event(3, scores=5), "not a mapping"]
    summary = summarise(events)
    assert summary["events"] == 1
    rows = replay(Policy.from_yaml_text(POLICY), events)
    assert [r.step for r in rows] == [1]


def test_json_that_nests_too_deeply_is_one_bad_line(tmp_path: Path) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1)), deep])
    scan = scan_events(log)
    assert len(scan.events) == 1 and scan.skipped == 1


def test_strict_still_raises_with_the_line_number(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1)), _line(_event(2, scores=5))])
    with pytest.raises(SSDGuardError, match=r"audit\.jsonl:2: .*scores is not an object"):
        read_events(log, strict=True)


def test_no_traceback_on_random_corruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], policy_file: Path
) -> None:
    rng = random.Random(11)
    good = b"\n".join(_line(_event(i)) for i in range(1, 9))
    log = tmp_path / "audit.jsonl"
    for trial in range(150):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos : pos + rng.randint(1, 40)]
            else:
                data[pos:pos] = rng.choice([b'"', b"{", b"[", b"\xc3", b"5", b"null", b"\n"])
        log.write_bytes(bytes(data))
        argv = ["audit", str(log)] + (["--replay", str(policy_file)] if trial % 2 else [])
        assert _run([*argv, "--json"] if trial % 3 == 0 else argv) == 0
        assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- numbers
def test_percentiles_are_numpys(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    totals = rng.gamma(2.0, 10.0, size=101).tolist()
    events = [_event(i, latency_ms={"total": t}) for i, t in enumerate(totals)]
    stats = summarise(events)["latency_ms"]["total"]
    p50, p90 = np.percentile(totals, [50, 90])
    assert stats["p50"] == pytest.approx(p50, rel=1e-12)
    assert stats["p90"] == pytest.approx(p90, rel=1e-12)
    assert stats["count"] == 101 and stats["max"] == max(totals)


# ---------------------------------------------------------------------------- pipes
class _ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_broken_pipe_is_quiet_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(i)) for i in range(1, 5)])
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert _run(["audit", str(log)]) == 141
    assert _run(["check-policy", str(ROOT / "policies" / "default.yaml")]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("read_first", [False, True], ids=["reader-gone", "head-1"])
def test_audit_piped_into_head_ends_without_a_traceback(
    tmp_path: Path, policy_file: Path, read_first: bool
) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(i)) for i in range(1, 3001)])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "ssd_guard.cli", "audit", str(log), "--replay", str(policy_file)]
    proc = subprocess.Popen(
        [*cmd, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path
    )
    assert proc.stdout is not None and proc.stderr is not None
    if read_first:  # like `| head -1`: read a little, then go away
        assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()  # reader-gone: closed before the command writes anything
    err = proc.stderr.read().decode("utf-8", "replace")
    code = proc.wait(timeout=120)
    assert (
        "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
    )
    assert err == ""
    assert code in ((0, 141) if read_first else (141,))


@pytest.mark.parametrize(
    "content",
    [b'{"entropy": [1e999, 10' + b"0" * 400 + b"]}", b"[" * 100_000, b'{"entropy": [\xff]}'],
    ids=["huge-int", "deep", "not-utf8"],
)
def test_a_bad_calibration_file_is_an_error_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1))])
    cal = tmp_path / "cal.json"
    cal.write_bytes(content)
    policy = str(ROOT / "policies" / "default.yaml")
    assert _run(["audit", str(log), "--replay", policy, "--calibration", str(cal)]) == 1
    err = capsys.readouterr().err
    assert f"ssd-guard: error: {cal}: " in err and "Traceback" not in err
