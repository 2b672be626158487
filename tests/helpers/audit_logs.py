"""Shared test helpers (moved from test_audit_robust.py; used by several test modules)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.policy_cli import _run  # noqa: F401  (the runtime CLI, shared)
from ssd_guard.audit import (
    DECISION_EVENT,
)


def _event(step: int, **over: Any) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "event": DECISION_EVENT,
        "timestamp": f"2025-01-01T10:00:{step % 60:02d}Z",
        "run_id": "r1",
        "parent_run_id": None,
        "step": step,
        "scope": "prompt",
        "model_id": "m",
        "hidden_state_source": "model",
        "student_fingerprint": "fp",
        "policy_name": "default",
        "policy_sha256": "0" * 64,
        "scores": {"entropy": 1.0 + step % 3},
        "thresholds": {},
        "rule": None,
        "action": "allow",
        "cache_hit": False,
        "latency_ms": {"score": 1.0, "total": 2.0 + step},
        "tags": ["medical"],
        "run_name": "agent-été",
    }
    ev.update(over)
    return ev


def _line(ev: dict[str, Any]) -> bytes:
    return json.dumps(ev, ensure_ascii=False).encode("utf-8")


def _write_log(path: Path, lines: list[bytes], *, newline_at_end: bool = True) -> Path:
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    return path
