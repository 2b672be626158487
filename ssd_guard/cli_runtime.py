"""Sub-commands of the runtime side: ``check-policy`` and ``audit``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "load_calibration"]


def add_commands(subparsers: Any) -> None:
    """Add ``check-policy`` and ``audit`` to the ``ssd-guard`` parser."""
    p = subparsers.add_parser(
        "check-policy",
        help="validate a YAML policy and describe its rules in plain words",
        description=(
            "Validate a YAML policy. Valid: print what each rule does, exit 0. "
            "Invalid: print FILE: KEY.PATH: reason to stderr, exit 1."
        ),
    )
    p.add_argument("file", metavar="FILE", help="policy YAML file")
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="student artifact dir or calibration JSON; shows quantile thresholds as raw values",
    )
    p.set_defaults(func=_check_policy)

    a = subparsers.add_parser(
        "audit",
        help="summarise an audit log, or replay it under another policy",
        description=(
            "Summarise the guard.decision events of a JSON-lines audit log: decisions per "
            "action and rule, score histograms, latency, slowest steps. With --replay, "
            "re-decide every logged step from its logged scores under another policy (no "
            "model is loaded) and report what changes."
        ),
    )
    a.add_argument("file", metavar="FILE", help="JSON-lines audit log")
    a.add_argument("--run", metavar="R", help="only run R (matches run_id or parent_run_id)")
    a.add_argument("--action", metavar="A", help="only decisions with action A")
    a.add_argument("--since", metavar="ISO", help="only events at or after this time (UTC)")
    a.add_argument("--until", metavar="ISO", help="only events at or before this time (UTC)")
    a.add_argument("--replay", metavar="POLICY", help="re-decide under this policy file")
    a.add_argument(
        "--calibration",
        metavar="PATH",
        help=(
            "for --replay: student artifact dir or JSON {metric: [values]} (default: the "
            "replay policy's student, when its rules use quantiles)"
        ),
    )
    a.add_argument("--json", action="store_true", help="print JSON instead of text")
    a.set_defaults(func=_audit)


def load_calibration(path: str | Path) -> dict[str, list[float]]:
    """Calibration values from a JSON file ``{"entropy": [...], "loglik": [...]}`` or a
    student artifact directory (``bundled`` for the shipped one)."""
    from ssd_guard.errors import ConfigError

    p = Path(path)
    if p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read calibration JSON: {exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get("calibration"), Mapping):
            data = data["calibration"]
        if not isinstance(data, Mapping) or not all(
            isinstance(v, list) and all(isinstance(x, int | float) for x in v)
            for v in data.values()
        ):
            raise ConfigError(f"{path}: expected a JSON object mapping metrics to lists of numbers")
        return {str(k): sorted(float(x) for x in v) for k, v in data.items()}
    from ssd_guard.artifact import load_artifact

    _, tensors = load_artifact(str(path))
    return {
        key.split(".", 1)[1]: sorted(t.flatten().tolist())
        for key, t in tensors.items()
        if key.startswith("calibration.")
    }


def _check_policy(args: argparse.Namespace) -> int:
    from ssd_guard.errors import SSDGuardError
    from ssd_guard.policy import describe_policy, load_policy

    try:
        policy = load_policy(args.file)
        calibration = load_calibration(args.calibration) if args.calibration else None
    except SSDGuardError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(describe_policy(policy, calibration))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from ssd_guard.audit import _read_events, format_replay, format_summary, replay, summarise

    events, skipped, _ = _read_events(args.file, event="guard.decision", strict=False)
    if skipped:
        print(f"ssd-guard: skipped {skipped} malformed line(s) in {args.file}", file=sys.stderr)
    filters = {"run_id": args.run, "action": args.action, "since": args.since, "until": args.until}
    if not args.replay:
        summary = summarise(events, **filters)
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print(format_summary(summary))
        return 0

    from ssd_guard.audit import filter_events
    from ssd_guard.policy import load_policy

    policy = load_policy(args.replay)
    calibration: dict[str, list[float]] | None = None
    if args.calibration:
        calibration = load_calibration(args.calibration)
    elif policy.requires_calibration:
        student = policy.student
        beside = Path(args.replay).parent / student
        if student != "bundled" and not Path(student).is_absolute() and beside.exists():
            student = str(beside)
        calibration = load_calibration(student)
    selected: Sequence[Mapping[str, Any]] = filter_events(events, **filters)
    rows = replay(policy, selected, calibration)
    if args.json:
        print(
            json.dumps(
                {
                    "policy": policy.name,
                    "policy_sha256": policy.sha256,
                    "decisions": len(rows),
                    "changed": sum(r.changed for r in rows),
                    "rows": [r.to_dict() for r in rows],
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(format_replay(rows, policy.name))
    return 0
