"""YAML parsing with bounds; errors reported as ``FILE: KEY.PATH: reason``
(:mod:`~ssd_guard.policy.reporting`, whose names are re-exported here).

Nothing here knows the policy schema: :func:`parse_policy_yaml` turns the bytes of a file
into plain Python data (or raises :class:`~ssd_guard.errors.PolicyError`). Parsing is
bounded so that a hostile file cannot hang or crash the process: a file larger than
:data:`MAX_POLICY_BYTES` is refused before it is parsed, composing stops at
:data:`MAX_YAML_NODES` nodes (so a large file costs at most that many), the nesting depth
and the number of nodes after alias expansion are limited, an alias that contains itself
is refused, and every key is checked once per node: for duplicates, and for a plain key
YAML 1.1 reads as something other than a string (``on:`` is the boolean true).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from ssd_guard.errors import type_phrase
from ssd_guard.policy.reporting import (
    ROOT,
    PathError,
    convert_validation_error,
    format_path,
    policy_error,
)

__all__ = [
    "MAX_POLICY_BYTES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "ROOT",
    "PathError",
    "convert_validation_error",
    "format_path",
    "parse_policy_yaml",
    "policy_error",
    "too_large_reason",
    "top_level_reason",
]

#: Largest policy file accepted, in bytes (1 MiB), checked before anything is parsed. A
#: policy of 1,000 plain rules is about 100 KB.
MAX_POLICY_BYTES = 1024 * 1024

#: Deepest nesting of YAML collections accepted (after alias expansion). A real policy
#: needs about ten levels; each ``all`` / ``any`` level adds two.
MAX_YAML_DEPTH = 100
#: Most YAML nodes accepted, in the file as written (each alias counts as one; composing
#: stops there) and after alias expansion (a policy of 1,000 rules has ~20,000).
MAX_YAML_NODES = 100_000

_EMPTY = "the file is empty; a policy needs at least 'name' and 'rules'"
#: Key path parts shown for a problem found deep inside expanded aliases.
_SHOWN_PARTS = 8


def too_large_reason(size: int | None) -> str:
    """Why a file of *size* bytes (``None``: more than the limit, size unknown) is refused."""
    got = f"{size:,} bytes" if size is not None else "more bytes than that"
    return (
        f"file too large: {got} > {MAX_POLICY_BYTES:,} bytes, the limit on a policy file "
        "(1,000 plain rules are about 100 KB)"
    )


def top_level_reason(data: Any) -> str:
    return f"expected a mapping of policy keys at the top level, got {type_phrase(data)}"


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
    (PyYAML composes recursively, so 5,000 levels would raise ``RecursionError``) and stops
    at the node after :data:`MAX_YAML_NODES` (each alias counts as one), so a large file
    costs at most that many nodes before it is refused."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _too_many_nodes(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
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


def _too_many_nodes(mark: Any) -> _LimitExceeded:
    return _LimitExceeded(
        f"line {mark.line + 1}, column {mark.column + 1}",
        f"too many YAML nodes: more than {MAX_YAML_NODES:,} in the file (a policy of 1,000 "
        "rules has about 20,000)",
    )


def _count_nodes_fast(text: str) -> None:
    """Raise :class:`_LimitExceeded` at the node after :data:`MAX_YAML_NODES` (each alias
    counts as one), with LibYAML's parser when PyYAML has it: it reads ~30 times faster than
    the pure-Python composer, which then never starts on such a file. Any other problem
    (nesting too deep included: LibYAML slows down there too) is left to that composer,
    whose messages and bounds are the ones reported."""
    if not getattr(yaml, "__with_libyaml__", False):
        return  # _BoundedLoader counts as it composes
    parser = yaml.CSafeLoader(text)
    try:
        nodes = depth = 0
        while parser.check_event():
            event = parser.get_event()
            if isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_YAML_NODES:
                    raise _too_many_nodes(event.start_mark)
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_YAML_DEPTH:
                        return
    except yaml.YAMLError:
        return
    finally:
        parser.dispose()


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


#: Tags of plain keys that construct to a string (a merge key ``<<`` and ``=`` included).
_NAME_TAGS = frozenset(
    {"tag:yaml.org,2002:str", "tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"}
)
_TRUE_WORDS = frozenset({"yes", "true", "on"})


def _read_as(node: yaml.ScalarNode) -> str:
    """What YAML makes of a plain key that is no string, in words."""
    kind = str(node.tag).rsplit(":", 1)[-1]
    if kind == "bool":
        value = "true" if str(node.value).lower() in _TRUE_WORDS else "false"
        return f"the boolean {value} (YAML 1.1)"
    if kind == "int":
        return "an integer"
    if kind == "float":
        return "a number"
    if kind == "null":
        return "null"
    if kind == "timestamp":
        return "a date"
    return f"a value tagged {node.tag}"


def _odd_key(node: yaml.MappingNode, path: tuple[str | int, ...]) -> tuple[str, str] | None:
    """The first scalar key that is not a string (``on``, ``yes``, ``1``, ``null``...):
    a policy's keys are names, and pydantic would only say "Keys should be strings" about
    a ``True`` the file never shows."""
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag not in _NAME_TAGS:
            key = str(key_node.value)
            return (
                format_path((*path, key)) or ROOT,
                f"key '{key}' on line {key_node.start_mark.line + 1} is read by YAML as "
                f"{_read_as(key_node)}, not as a name; quote it ('{key}') if a name is meant",
            )
    return None


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

    Returns the first problem as ``(key path, reason)``: a key that is no string, a
    duplicate mapping key, an alias that contains itself, more than :data:`MAX_YAML_NODES`
    nodes or more than :data:`MAX_YAML_DEPTH` levels once aliases are expanded. Expanded
    sizes and depths of shared nodes are memoised, so an alias bomb costs its size in the
    file, not its expansion.
    """
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    on_path: set[int] = set()
    stack: list[_Frame] = []

    def push(node: yaml.Node, path: tuple[str | int, ...]) -> tuple[str, str] | None:
        if isinstance(node, yaml.MappingNode):
            odd = _odd_key(node, path) or _duplicate_key(node, path)
            if odd is not None:
                return odd
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


#: Line breaks as the YAML reader counts them (for positions found before it runs).
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def _position(text: str, index: int) -> str:
    """``line L, column C`` (1-based, as YAML's own marks) of character *index*."""
    line, start = 1, 0
    for brk in _LINE_BREAK.finditer(text, 0, index):
        line, start = line + 1, brk.end()
    return f"line {line}, column {index - start + 1}"


def _character_name(code: int) -> str:
    if code == 0:
        return "NUL"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return "a control character"
    if 0xD800 <= code <= 0xDFFF:
        return "a lone surrogate"
    return "a non-character"


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> tuple[str, str]:
    start = exc.start
    line_start = data.rfind(b"\n", 0, start) + 1
    column = len(data[line_start:start].decode("utf-8", "replace")) + 1
    line = data.count(b"\n", 0, start) + 1
    where = f"line {line}, column {column}"
    return where, f"not UTF-8 text ({exc.reason}: byte 0x{data[start]:02x} at offset {start})"


def parse_policy_yaml(data: bytes, source: str, *, key_lines: dict[str, int] | None = None) -> Any:
    """Decode and parse a policy file's bytes into plain data (not yet validated).

    Raises :class:`PolicyError` naming *source* for a file larger than
    :data:`MAX_POLICY_BYTES`, non-UTF-8 bytes and characters YAML refuses (NUL, control
    characters: ``line L, column C``), an empty file, YAML syntax errors (``line L,
    column C``), more than :data:`MAX_YAML_NODES` nodes in the file, keys that YAML reads
    as no string (``on``, ``yes``, ``1``...), duplicate keys, recursive aliases, and YAML
    that is nested too deeply or expands to too many nodes through aliases. Bounded:
    returns (or raises) in time proportional to the file's size, at most that of
    :data:`MAX_YAML_NODES` nodes. *key_lines*, when given, receives the line of each
    top-level key (what an unknown-key error names).
    """
    if len(data) > MAX_POLICY_BYTES:
        raise policy_error(source, ROOT, too_large_reason(len(data)))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise policy_error(source, *_not_utf8(data, exc)) from None
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        raise policy_error(source, ROOT, _EMPTY)
    try:
        loader = _BoundedLoader(text)  # checks every character first
    except yaml.reader.ReaderError as exc:
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character))
        reason = (
            f"invalid YAML: unacceptable character #x{code:04x} ({_character_name(code)}): "
            "special characters are not allowed in YAML"
        )
        raise policy_error(source, _position(text, exc.position), reason) from None
    try:
        _count_nodes_fast(text)
        node = loader.get_single_node()
        if node is None:
            raise policy_error(source, ROOT, _EMPTY)
        problem = _check_tree(node)
        if problem is not None:
            raise policy_error(source, *problem)
        if key_lines is not None and isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key_lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
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
