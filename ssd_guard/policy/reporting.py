"""Error reporting for policies: every problem as ``FILE: KEY.PATH: reason``.

:func:`convert_validation_error` turns a pydantic error of any model into one line per
problem, naming the key path, the line of a top-level key and, for a misspelt key, the
closest known one; :class:`PathError` lets a validator report several problems at once.
Nothing here parses YAML (:mod:`~ssd_guard.policy.parsing`) or knows the policy schema.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ssd_guard.errors import PolicyError, type_phrase

__all__ = [
    "ROOT",
    "PathError",
    "convert_validation_error",
    "format_path",
    "policy_error",
    "policy_errors",
]

#: The path shown for a problem of the whole file.
ROOT = "<root>"


class PathError(ValueError):
    """A validation error that knows the key path below the model that raised it;
    :meth:`of` makes one holding every problem a validator found (:attr:`problems`)."""

    def __init__(self, subpath: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.subpath = tuple(subpath)
        self.message = message
        self.problems: list[tuple[tuple[str | int, ...], str]] = [(self.subpath, message)]

    @classmethod
    def of(cls, problems: Sequence[tuple[Sequence[str | int], str]]) -> PathError:
        """One error for all *problems* (``(subpath, message)``, the first one first)."""
        first = cls(*problems[0])
        first.problems = [(tuple(sub), msg) for sub, msg in problems]
        if len(problems) > 1:
            first.args = ("; ".join(msg for _, msg in problems),)
        return first


def format_path(loc: Sequence[str | int]) -> str:
    """``("rules", 0, "when")`` -> ``rules[0].when``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def policy_error(source: str, path: str, reason: str) -> PolicyError:
    """``PolicyError("FILE: PATH: reason")`` carrying ``source``, ``key_path``, ``reason``."""
    err = PolicyError(f"{source}: {path}: {reason}")
    err.source = source  # type: ignore[attr-defined]
    err.key_path = path  # type: ignore[attr-defined]
    err.reason = reason  # type: ignore[attr-defined]
    err.problems = [(path, reason)]  # type: ignore[attr-defined]
    return err


def policy_errors(source: str, problems: Sequence[tuple[str, str]]) -> PolicyError:
    """One :class:`PolicyError` for several ``(path, reason)`` problems, one line each."""
    first_path, first_reason = problems[0]
    error = policy_error(source, first_path, first_reason)
    if len(problems) > 1:
        error.args = ("\n".join(f"{source}: {p}: {r}" for p, r in problems),)
    error.problems = list(problems)  # type: ignore[attr-defined]
    return error


def _type_name(value: Any) -> str:
    return type_phrase(value)


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that validates the mapping at *loc* (below *root*)."""
    cls: type[BaseModel] = root
    for part in loc:
        if isinstance(part, int):
            continue
        fld = None
        for fname, info in cls.model_fields.items():
            if part in (fname, info.alias):
                fld = info
                break
        if fld is None:
            return None
        inner = _inner_model(fld.annotation, cls)
        if inner is None:
            return None
        cls = inner
    return cls


def _inner_model(annotation: Any, owner: type[BaseModel]) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType, list, Annotated) or get_origin(
        annotation
    ):
        for arg in get_args(annotation):
            found = _inner_model(arg, owner)
            if found is not None:
                return found
    if isinstance(annotation, typing.ForwardRef | str):
        name = (
            annotation.__forward_arg__ if isinstance(annotation, typing.ForwardRef) else annotation
        )
        found = vars(sys.modules[owner.__module__]).get(name)
        if isinstance(found, type) and issubclass(found, BaseModel):
            return found
    return None


_LIMIT_SYMBOL = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _reason(
    err: Mapping[str, Any], root: type[BaseModel], key_lines: Mapping[str, int] | None = None
) -> tuple[tuple[str | int, ...], str]:
    """A short human reason for one pydantic error, and extra path parts (*key_lines*: the
    line of each top-level key, named for an unknown one)."""
    etype = err["type"]
    loc = tuple(err["loc"])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if etype == "value_error":
        exc = ctx.get("error")
        if isinstance(exc, PathError):
            return exc.subpath, exc.message
        return (), str(exc) if exc is not None else err["msg"]
    if etype == "extra_forbidden":
        model = _model_at(root, loc[:-1])
        key = str(loc[-1]) if loc else "?"
        line = (key_lines or {}).get(key) if len(loc) == 1 else None
        where = f" on line {line}" if line is not None else ""
        if model is None:
            return (), f"unknown key '{key}'{where}"
        allowed = sorted(info.alias or name for name, info in model.model_fields.items())
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        return (), f"unknown key '{key}'{where}{hint}"
    if etype == "missing":
        return (), "required key missing"
    if etype in ("float_type", "float_parsing", "finite_number"):
        return (), f"expected a number, got {_type_name(value)}"
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return (), f"expected an integer, got {_type_name(value)}"
    if etype == "string_type":
        return (), f"expected a string, got {_type_name(value)}"
    if etype == "bool_type":
        return (), f"expected true or false, got {_type_name(value)}"
    if etype == "list_type":
        return (), f"expected a list, got {_type_name(value)}"
    if etype in ("model_type", "dict_type", "model_attributes_type"):
        return (), f"expected a mapping, got {_type_name(value)}"
    if etype == "literal_error":
        return (), f"expected one of {ctx.get('expected', '?')}, got {value!r}"
    if etype == "too_short":
        return (), "expected a non-empty list"
    if etype in _LIMIT_SYMBOL:
        limit = next(iter(ctx.values()), "?")
        return (), f"must be {_LIMIT_SYMBOL[etype]} {limit}, got {value!r}"
    return (), str(err["msg"])


def convert_validation_error(
    exc: ValidationError,
    source: str,
    root: type[BaseModel],
    key_lines: Mapping[str, int] | None = None,
) -> PolicyError:
    """A pydantic error of model *root* as :class:`PolicyError`, one line per problem
    (*key_lines*: the line of each top-level key, as :func:`parse_policy_yaml` reports)."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        found = (err.get("ctx") or {}).get("error") if err["type"] == "value_error" else None
        if isinstance(found, PathError):  # every problem its validator found
            pairs = [(format_path((*err["loc"], *sub)) or ROOT, m) for sub, m in found.problems]
        else:
            extra, reason = _reason(err, root, key_lines)
            pairs = [(format_path((*err["loc"], *extra)) or ROOT, reason)]
        problems.extend(pair for pair in pairs if pair not in problems)
    return policy_errors(source, problems)
