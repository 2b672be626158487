"""Sub-commands of the runtime side: ``check-policy`` and ``audit``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ssd_guard._commands import add_command

if TYPE_CHECKING:
    from ssd_guard.audit import EventScan

__all__ = ["add_commands", "load_calibration"]


def add_commands(subparsers: Any) -> None:
    """Add ``check-policy`` and ``audit`` to the ``ssd-guard`` parser."""
    p = add_command(subparsers, "check-policy", _check_policy)
    p.add_argument("files", nargs="+", metavar="FILE", help="policy YAML file(s)")
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="student artifact dir or calibration JSON; shows quantile thresholds as raw values",
    )

    a = add_command(subparsers, "audit", _audit)
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


def load_calibration(path: str | Path) -> dict[str, list[float]]:
    """Calibration values from a JSON file ``{"entropy": [...], "loglik": [...]}`` or a
    student artifact directory (``bundled`` for the shipped one)."""
    from ssd_guard.errors import ConfigError

    p = Path(path)
    if p.is_file():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(f"{path}: cannot read calibration JSON: {exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get("calibration"), Mapping):
            data = data["calibration"]
        expected = f"{path}: expected a JSON object mapping metrics to lists of numbers"
        if not isinstance(data, Mapping) or not all(
            isinstance(v, list)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            for v in data.values()
        ):
            raise ConfigError(expected)
        try:
            return {str(k): sorted(float(x) for x in v) for k, v in data.items()}
        except OverflowError:
            raise ConfigError(f"{expected} (a number is out of range)") from None
    from ssd_guard.artifact import load_artifact

    _, tensors = load_artifact(str(path))
    return {
        key.split(".", 1)[1]: sorted(t.flatten().tolist())
        for key, t in tensors.items()
        if key.startswith("calibration.")
    }


def _write(text: str, stream: IO[str] | None = None) -> None:
    """Print *text* and flush; characters the stream cannot encode (a lone surrogate read
    from a log, say) are written as backslash escapes instead of raising."""
    out = stream if stream is not None else sys.stdout
    encoding = getattr(out, "encoding", None) or "utf-8"
    try:
        safe = text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        safe = text.encode("ascii", "backslashreplace").decode("ascii")
    out.write(safe + "\n")
    out.flush()


def _pipe_safe(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run *command*; when the reader of stdout goes away (``... | head``), stop quietly
    with exit status 141 (128 + SIGPIPE, what a shell shows for a process killed by it)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except BrokenPipeError:
            # Point stdout at /dev/null so the interpreter's final flush cannot fail again.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            return 141

    return run


@_pipe_safe
def _check_policy(args: argparse.Namespace) -> int:
    """Validate YAML policies and describe their rules in plain words.

    Validate YAML policies, including that the student directory and proxy model they
    name exist. Valid: print what each rule does. Invalid: print FILE: KEY.PATH: reason
    to stderr. Exit 1 if any file is invalid, else 0.
    """
    from ssd_guard.errors import SSDGuardError
    from ssd_guard.policy import check_policy_file, describe_policy

    calibration = None
    if args.calibration:
        try:
            calibration = load_calibration(args.calibration)
        except SSDGuardError as exc:
            _write(str(exc), sys.stderr)
            return 1
    several = len(args.files) > 1
    failed = 0
    for i, file in enumerate(args.files):
        try:
            policy = check_policy_file(file)  # every problem of the file at once
        except SSDGuardError as exc:
            failed += 1
            _write(str(exc), sys.stderr)
            continue
        text = describe_policy(policy, calibration)
        if several:
            text = ("\n" if i else "") + f"==> {file}: valid <==\n" + text
        _write(text)
    if several and failed:
        _write(f"ssd-guard: {failed} of {len(args.files)} policies are invalid", sys.stderr)
    return 1 if failed else 0


def _skipped_note(scan: EventScan) -> str:
    shown = "; ".join(f"line {n}: {why}" for n, why in scan.problems[:5])
    more = ", ..." if scan.skipped > 5 else ""
    return f"ssd-guard: skipped {scan.skipped} bad line(s) in {scan.source} ({shown}{more})"


@_pipe_safe
def _audit(args: argparse.Namespace) -> int:
    """Summarise an audit log, or replay it under another policy.

    Summarise the guard.decision events of a JSON-lines audit log: decisions per action
    and rule, score histograms, latency, slowest steps. With --replay, re-decide every
    logged step from its logged scores under another policy (no model is loaded) and
    report what changes. Unreadable or malformed lines are skipped and counted on stderr
    (and as skipped_lines with --json).
    """
    from ssd_guard.audit import (
        DECISION_EVENT,
        filter_events,
        format_replay,
        format_summary,
        replay,
        scan_events,
        summarise,
    )

    scan = scan_events(args.file, event=DECISION_EVENT)
    if scan.skipped:
        _write(_skipped_note(scan), sys.stderr)
    filters = {"run_id": args.run, "action": args.action, "since": args.since, "until": args.until}
    if not args.replay:
        summary = summarise(scan.events, **filters)
        if args.json:
            _write(json.dumps({**summary, "skipped_lines": scan.skipped}, indent=2, default=str))
        else:
            _write(format_summary(summary))
        return 0

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
    selected: Sequence[Mapping[str, Any]] = filter_events(scan.events, **filters)
    rows = replay(policy, selected, calibration)
    if args.json:
        _write(
            json.dumps(
                {
                    "policy": policy.name,
                    "policy_sha256": policy.sha256,
                    "decisions": len(rows),
                    "changed": sum(r.changed for r in rows),
                    "skipped_lines": scan.skipped,
                    "rows": [r.to_dict() for r in rows],
                },
                indent=2,
                default=str,
            )
        )
    else:
        _write(format_replay(rows, policy.name))
    return 0
