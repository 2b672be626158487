"""Sub-commands of ``ssd-guard``, each declared by its handler: the handler's docstring is
its help (the first paragraph, shown in ``ssd-guard --help``) and its description (the
rest, shown in ``ssd-guard COMMAND --help``)."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["add_command"]


def add_command(
    subparsers: Any, name: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """Add the sub-command *name* that runs ``handler(args)`` (its exit status)."""
    doc = inspect.cleandoc(handler.__doc__ or "")
    head, _, rest = doc.partition("\n\n")
    head = " ".join(head.split()).removesuffix(".")
    if head[1:2].islower():  # argparse style: the one-line help starts in lower case
        head = head[0].lower() + head[1:]
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=head, description=" ".join(rest.split()) or None
    )
    parser.set_defaults(func=handler)
    return parser
