"""Shared test helpers (moved from test_policy_cli.py; used by several test modules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssd_guard.cli_runtime import add_commands
from ssd_guard.errors import SSDGuardError


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ssd-guard")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SSDGuardError as exc:  # what ssd_guard.cli.main does
        print(f"ssd-guard: error: {exc}", file=sys.stderr)
        return 1


def _fake_student(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"")
    return directory
