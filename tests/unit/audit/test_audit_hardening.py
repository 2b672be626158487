"""A decision whose score is NaN is a bad line of the audit log (the writer logs NaN as
null, so a NaN was never written by the guard): ``ssd-guard audit`` skips and counts it
with its reason, like any other malformed line, instead of summarising it as good."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers.audit_logs import _event, _line, _run, _write_log

from ssd_guard.audit import event_problem, read_events, scan_events, summarise
from ssd_guard.errors import SSDGuardError


def _nan_line(step: int, field: str = "scores", key: str = "pmi") -> bytes:
    ev = _event(step)
    ev[field] = {**(ev.get(field) or {}), key: math.nan}
    line = json.dumps(ev, ensure_ascii=False)  # allow_nan: writes the literal NaN
    assert f'"{key}": NaN' in line
    return line.encode("utf-8")


@pytest.mark.parametrize(
    ("field", "key"),
    [("scores", "pmi"), ("scores", "entropy"), ("thresholds", "pmi"), ("latency_ms", "total")],
)
def test_a_nan_number_is_a_bad_line_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, key: str
) -> None:
    log = _write_log(
        tmp_path / "audit.jsonl",
        [_line(_event(1)), _nan_line(2, field, key), _line(_event(3))],
    )
    assert _run(["audit", str(log), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["events"] == 2 and summary["skipped_lines"] == 1
    assert f"line 2: {field}.{key} is NaN" in captured.err
    assert "Traceback" not in captured.err
    scan = scan_events(log)
    assert [ev["step"] for ev in scan.events] == [1, 3]
    assert scan.problems == [(2, f"{field}.{key} is NaN (not a number)")]


def test_the_text_summary_counts_only_the_good_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_nan_line(1), _line(_event(2))])
    assert _run(["audit", str(log)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("1 decisions in 1 runs")
    assert "skipped 1 bad line(s)" in captured.err and "scores.pmi is NaN" in captured.err


def test_strict_reading_raises_on_a_nan_score(tmp_path: Path) -> None:
    log = _write_log(tmp_path / "audit.jsonl", [_line(_event(1)), _nan_line(2)])
    with pytest.raises(SSDGuardError, match=r"audit\.jsonl:2: .*scores\.pmi is NaN"):
        read_events(log, strict=True)


def test_in_memory_events_with_a_nan_score_are_left_out() -> None:
    bad: dict[str, Any] = _event(2, scores={"pmi": math.nan})
    assert event_problem(bad) == "scores.pmi is NaN (not a number)"
    assert summarise([_event(1), bad])["events"] == 1


def test_null_and_infinite_scores_stay_good(tmp_path: Path) -> None:
    ok = [
        _line(_event(1, scores={"pmi": None})),  # what the writer makes of a NaN
        _line(_event(2, scores={"pmi": "-inf"})),  # and of an infinity
        _line(_event(3, scores={"pmi": -1.5})),
    ]
    scan = scan_events(_write_log(tmp_path / "audit.jsonl", ok))
    assert scan.skipped == 0 and len(scan.events) == 3
    assert scan.events[1]["scores"]["pmi"] == -math.inf
