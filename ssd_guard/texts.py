"""The argument checks shared by the guard and the scorers: text they are given must be a
``str`` that encodes as UTF-8 (no lone surrogate), a list of texts never a single string;
anything else raises :class:`~ssd_guard.errors.GuardInputError` naming the argument and
index."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ssd_guard.errors import GuardInputError

__all__ = ["check_text", "check_text_lists", "check_texts"]


# --------------------------------------------------------------------------------------
# Argument checks (shared by the guard and the scorers)
# --------------------------------------------------------------------------------------
def _wrong_type(name: str, value: Any, expected: str) -> GuardInputError:
    hint = " (decode bytes to str first)" if isinstance(value, bytes | bytearray) else ""
    return GuardInputError(name, f"{name} must be {expected}, got {type(value).__name__}{hint}")


def check_text(name: str, value: Any, *, expected: str = "a str") -> str:
    """*value* if it is text the scorer, the tokenizers and the cache can take (a ``str``
    that encodes as UTF-8); else :class:`~ssd_guard.errors.GuardInputError` naming *name*
    (``"prompts[2]"``...)."""
    if not isinstance(value, str):
        raise _wrong_type(name, value, expected)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise GuardInputError(
                name,
                f"{name} is not valid Unicode text: lone surrogate {value[exc.start]!r} at "
                f"index {exc.start}",
            ) from None
    return value


def _as_items(name: str, value: Any) -> list[Any]:
    """*value* (a list / tuple / iterable, never a single string or a mapping) as a list."""
    if isinstance(value, str | bytes | bytearray):
        raise GuardInputError(
            name,
            f"{name} must be a list of str, got a single {type(value).__name__} (it would be "
            f"split into characters); wrap it in a list: [{name}]",
        )
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise GuardInputError(name, f"{name} must be a list of str, got {type(value).__name__}")
    return list(value)


def check_texts(name: str, value: Any) -> list[str]:
    """*value* (a list / tuple / iterable of str, never a single string) as a list, each
    item checked by :func:`check_text` as ``name[i]``."""
    return [check_text(f"{name}[{i}]", item) for i, item in enumerate(_as_items(name, value))]


def check_text_lists(name: str, value: Any) -> list[str | list[str]]:
    """*value*: one entry per prompt, each a str or a list of str (candidate answers)."""
    out: list[str | list[str]] = []
    for i, item in enumerate(_as_items(name, value)):
        key = f"{name}[{i}]"
        if isinstance(item, str):
            out.append(check_text(key, item))
        elif isinstance(item, Iterable) and not isinstance(item, bytes | bytearray | Mapping):
            out.append(check_texts(key, item))
        else:
            raise _wrong_type(key, item, "a str or a list of str")
    return out
