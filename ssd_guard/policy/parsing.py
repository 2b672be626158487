"""YAML parsing with bounds, and error reporting as ``FILE: KEY.PATH: reason``.

Nothing here knows the policy schema: :func:`parse_policy_yaml` turns the bytes of a file
into plain Python data (or raises :class:`~ssd_guard.errors.PolicyError`), and
:func:`convert_validation_error` turns a pydantic error of any model into one line per
problem. Parsing is bounded so that a hostile file cannot hang or crash the process: the
nesting depth and the number of nodes after alias expansion are limited, an alias that
contains itself is refused, and every key is checked for duplicates once per node.
"""

from __future__ import annotations

import difflib
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ssd_guard.errors import PolicyError, type_phrase

__all__ = [
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "ROOT",
    "PathError",
    "convert_validation_error",
    "format_path",
    "parse_policy_yaml",
    "policy_error",
    "top_level_reason",
]

#: Deepest nesting of YAML collections accepted (after alias expansion). A real policy
#: needs about ten levels; each ``all`` / ``any`` level adds two.
MAX_YAML_DEPTH = 100
#: Most YAML nodes accepted after alias expansion (a policy of 1,000 rules has ~20,000).
MAX_YAML_NODES = 100_000

ROOT = "<root>"
_EMPTY = "the file is empty; a policy needs at least 'name' and 'rules'"
#: Key path parts shown for a problem found deep inside expanded aliases.
_SHOWN_PARTS = 8


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
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


def top_level_reason(data: Any) -> str:
    return f"expected a mapping of policy keys at the top level, got {_type_name(data)}"


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


def _reason(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[tuple[str | int, ...], str]:
    """A short human reason for one pydantic error, and extra path parts."""
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
        if model is None:
            return (), f"unknown key '{key}'"
        allowed = sorted(info.alias or name for name, info in model.model_fields.items())
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        return (), f"unknown key '{key}'{hint}"
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
    exc: ValidationError, source: str, root: type[BaseModel]
) -> PolicyError:
    """A pydantic error of model *root* as :class:`PolicyError`, one line per problem."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        found = (err.get("ctx") or {}).get("error") if err["type"] == "value_error" else None
        if isinstance(found, PathError):  # every problem its validator found
            pairs = [(format_path((*err["loc"], *sub)) or ROOT, m) for sub, m in found.problems]
        else:
            extra, reason = _reason(err, root)
            pairs = [(format_path((*err["loc"], *extra)) or ROOT, reason)]
        problems.extend(pair for pair in pairs if pair not in problems)
    return policy_errors(source, problems)


# --------------------------------------------------------------------------------------
# Bounded YAML
# --------------------------------------------------------------------------------------
class _LimitExceeded(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader whose composer refuses nesting deeper than :data:`MAX_YAML_DEPTH`
    (PyYAML composes recursively, so 5,000 levels would raise ``RecursionError``)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _LimitExceeded(
                    f"line {mark.line + 1}, column {mark.column + 1}",
                    f"the YAML is nested deeper than {MAX_YAML_DEPTH} levels",
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # The scanner reads ~1,000 '[' ahead of the composer (quadratic bookkeeping of
        # possible simple keys); stop deep flow collections where they are scanned.
        if self.flow_level >= MAX_YAML_DEPTH:
            mark = self.get_mark()
            raise _LimitExceeded(
                f"line {mark.line + 1}, column {mark.column + 1}",
                f"the YAML is nested deeper than {MAX_YAML_DEPTH} levels",
            )
        super().fetch_flow_collection_start(TokenClass)


def _key_text(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    # Never str() a collection key: a Node's repr expands its aliases.
    kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
    return f"<{kind} key on line {node.start_mark.line + 1}>"


def _children(
    node: yaml.Node, path: tuple[str | int, ...]
) -> list[tuple[yaml.Node, tuple[str | int, ...]]]:
    if isinstance(node, yaml.MappingNode):
        out: list[tuple[yaml.Node, tuple[str | int, ...]]] = []
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            out.append((key_node, (*path, key)))
            out.append((value_node, (*path, key)))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(item, (*path, i)) for i, item in enumerate(node.value)]
    return []


def _duplicate_key(node: yaml.MappingNode, path: tuple[str | int, ...]) -> tuple[str, str] | None:
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        key = _key_text(key_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            return (
                format_path((*path, key)),
                f"duplicate key '{key}' (line {line}; first on line {seen[key]})",
            )
        seen[key] = line
    return None


def _check_tree(root: yaml.Node) -> tuple[str, str] | None:
    """Walk the composed YAML graph once per node, without recursion.

    Returns the first problem as ``(key path, reason)``: a duplicate mapping key, an alias
    that contains itself, more than :data:`MAX_YAML_NODES` nodes or more than
    :data:`MAX_YAML_DEPTH` levels once aliases are expanded. Expanded sizes and depths of
    shared nodes are memoised, so an alias bomb costs its size in the file, not its
    expansion.
    """
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    on_path: set[int] = set()
    stack: list[_Frame] = []

    def push(node: yaml.Node, path: tuple[str | int, ...]) -> tuple[str, str] | None:
        if isinstance(node, yaml.MappingNode):
            dup = _duplicate_key(node, path)
            if dup is not None:
                return dup
        on_path.add(id(node))
        stack.append(_Frame(node, path, _children(node, path)))
        return None

    problem = push(root, ())
    while problem is None and stack:
        frame = stack[-1]
        if frame.next_child < len(frame.children):
            child, child_path = frame.children[frame.next_child]
            frame.next_child += 1
            if id(child) in done:  # an alias of a node seen before
                size, depth = done[id(child)]
                if len(stack) + depth > MAX_YAML_DEPTH:
                    return _too_deep(child_path)
                frame.add(size, depth)
            elif id(child) in on_path:
                return format_path(child_path), "recursive alias: the node contains itself"
            else:
                problem = push(child, child_path)
            continue
        stack.pop()
        on_path.discard(id(frame.node))
        size, depth = frame.nodes + 1, frame.depth + 1
        done[id(frame.node)] = (size, depth)
        if depth > MAX_YAML_DEPTH:
            return _too_deep(frame.path)
        if stack:
            stack[-1].add(size, depth)
        if size > MAX_YAML_NODES or (stack and stack[-1].nodes > MAX_YAML_NODES):
            return (
                ROOT,
                f"the YAML expands to more than {MAX_YAML_NODES:,} nodes through aliases "
                "(an alias bomb?)",
            )
    return problem


@dataclass
class _Frame:
    node: yaml.Node
    path: tuple[str | int, ...]
    children: list[tuple[yaml.Node, tuple[str | int, ...]]]
    next_child: int = 0
    nodes: int = 0
    """Expanded nodes below this one so far."""
    depth: int = 0
    """Expanded depth below this one so far."""

    def add(self, nodes: int, depth: int) -> None:
        self.nodes += nodes
        self.depth = max(self.depth, depth)


def _too_deep(path: tuple[str | int, ...]) -> tuple[str, str]:
    shown = format_path(path[:_SHOWN_PARTS]) or ROOT
    if len(path) > _SHOWN_PARTS:
        shown += "..."
    return (
        shown,
        f"the YAML is nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded",
    )


def parse_policy_yaml(data: bytes, source: str) -> Any:
    """Decode and parse a policy file's bytes into plain data (not yet validated).

    Raises :class:`PolicyError` naming *source* for non-UTF-8 bytes, an empty file, YAML
    syntax errors (``line L, column C``), duplicate keys, recursive aliases, and YAML that
    is nested too deeply or expands to too many nodes. Bounded: returns (or raises) in time
    proportional to the file's size.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise policy_error(source, ROOT, reason) from None
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise policy_error(source, ROOT, _EMPTY)
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise policy_error(source, ROOT, _EMPTY)
        problem = _check_tree(node)
        if problem is not None:
            raise policy_error(source, *problem)
        parsed = loader.construct_document(node)
    except _LimitExceeded as exc:
        raise policy_error(source, exc.path, exc.reason) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ROOT
        problem_text = exc.problem or exc.context or "invalid YAML"
        raise policy_error(source, where, f"invalid YAML: {problem_text}") from None
    except yaml.YAMLError as exc:
        raise policy_error(source, ROOT, f"invalid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. the date 2001-13-45
        raise policy_error(source, ROOT, f"invalid YAML value: {exc}") from None
    finally:
        loader.dispose()
    if parsed is None:
        raise policy_error(source, ROOT, _EMPTY)
    return parsed
