"""The `ssd-guard` command line: demo, distill, evaluate, score, check-policy, audit, bench.

Each sub-command lives with the code it drives; a module contributes its commands with
``add_commands(subparsers)`` and this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: Modules that contribute sub-commands, in help order.
_COMMAND_MODULES = (
    "ssd_guard.cli_demo",
    "ssd_guard.cli_engine",
    "ssd_guard.cli_runtime",
    "ssd_guard.cli_calibrate",
    "ssd_guard.cli_drafts",
    "ssd_guard.evaluation.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssd-guard",
        description="Semantic Self-Distillation uncertainty guardrails for LLM calls.",
    )
    from ssd_guard._version import __version__

    parser.add_argument("--version", action="version", version=f"ssd-guard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ssd_guard.errors import SSDGuardError

    try:
        return int(args.func(args) or 0)
    except SSDGuardError as exc:
        print(f"ssd-guard: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
