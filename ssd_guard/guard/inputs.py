"""The arguments of a guarded call: the options objects the flows take, and their checks.

One set of checks for the guard and the scorers (:mod:`ssd_guard.encoding`): a text is a
str that encodes as UTF-8, a list of texts never a single string. Each check raises
:class:`~ssd_guard.errors.GuardInputError` naming the argument; the flows run them when
they start (a call's options are not checked when they are made).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ssd_guard.encoding import check_text, check_texts
from ssd_guard.errors import GuardInputError
from ssd_guard.policy import Decision, Scope
from ssd_guard.scoring.callstats import CallStats

__all__ = [
    "CallOptions",
    "Check",
    "CheckKwargs",
    "CompleteKwargs",
    "DocumentsKwargs",
    "OnReject",
    "PrepareKwargs",
    "RunKwargs",
    "Source",
    "check_call",
    "check_items",
    "check_meta",
    "retrieved",
]

#: Where documents come from (``source`` of a document-scope decision).
Source = Literal["retrieval", "tool", "cache"]

#: Turns a ``reject_answer`` decision into the one recorded, with fields for its event.
OnReject = Callable[[Decision], tuple[Decision, Mapping[str, Any]]]

# (the names the guard's checks had: the guard and the scorers share one validator)
_check_text = check_text
_check_texts = check_texts


class CheckKwargs(TypedDict, total=False):
    """The keywords of every check (``check_prompt``, ``check_answer``...)."""

    tags: Sequence[str]
    run_name: str | None
    stats: CallStats | None


class DocumentsKwargs(CheckKwargs, total=False):
    """The keywords of a document check (``check_documents``, ``screen_documents``)."""

    source: Source


class PrepareKwargs(DocumentsKwargs, total=False):
    """The keywords of ``prepare``: those of a document check, and the call's own."""

    documents: Sequence[str] | None
    check_prompt: bool
    run_id: str | None
    parent_run_id: str | None


class CompleteKwargs(TypedDict, total=False):
    """The keywords of ``complete``."""

    extract: Callable[[Any], str | None] | None
    tags: Sequence[str]
    run_name: str | None
    deterministic: bool | None


class RunKwargs(PrepareKwargs, total=False):
    """The keywords of ``run``: those of ``prepare`` and of ``complete``."""

    extract: Callable[[Any], str | None] | None
    deterministic: bool | None


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """The keyword arguments of one guarded call, as the public methods take them (see
    :meth:`Guard.run <ssd_guard.guard.Guard.run>`), carried by every flow of the call.

    The public sync and async twins build one and hand it to the flow they drive; a flow
    that changes one for a step (the call's :class:`CallStats`, the run id it bound) makes
    a copy with :func:`dataclasses.replace`."""

    tags: Sequence[str] = ()
    run_name: str | None = None
    stats: CallStats | None = None
    """What the call computes (the question's hidden state...); ``None``: a new one."""
    documents: Sequence[str] | None = None
    """Documents given with the call (checked at document scope, put in the prompt)."""
    source: Source = "retrieval"
    """Where the documents checked at document scope come from."""
    check_prompt: bool = True
    run_id: str | None = None
    parent_run_id: str | None = None
    extract: Callable[[Any], str | None] | None = None
    """``raw -> answer text`` for a ``generate`` that does not return a str."""
    deterministic: bool | None = None
    """Whether ``generate`` always gives the same answer (see the regeneration rules)."""


@dataclass(frozen=True)
class Check:
    """One scope check: what is scored (*prompt*, *items*) and how it is decided."""

    scope: Scope
    prompt: str
    items: Sequence[str | None]
    """``[None]`` for a prompt check (the prompt itself); the answers / documents else."""
    entropy: float | None = None
    """The prompt's entropy when already known (not looked up again)."""
    source: Source | None = None
    """A document check's ``source`` (``None`` on scope prompt / answer)."""
    extra: Mapping[str, Any] | None = None
    """Fields added to each of the check's audit events."""
    on_reject: OnReject | None = None
    """Turns a ``reject_answer`` decision into the one recorded (``abstain`` when nothing
    more is tried) and adds fields to its event."""
    skip_actions: Sequence[str] = ()
    """Rules whose action is one of these are left out."""


def check_meta(tags: Any, run_name: Any) -> None:
    """*tags* is a list of texts, *run_name* a text or ``None``."""
    _check_texts("tags", tags)
    if run_name is not None:
        _check_text("run_name", run_name)


def check_call(prompt: Any, opts: CallOptions) -> tuple[str, list[str] | None]:
    """A call's metadata, documents and prompt (in that order); returns the prompt and
    the documents as a list."""
    check_meta(opts.tags, opts.run_name)
    docs = None if opts.documents is None else _check_texts("documents", opts.documents)
    return _check_text("prompt", prompt), docs


def check_items(check: Check, opts: CallOptions) -> None:
    """A scope check's prompt, items (answers / documents) and metadata."""
    _check_text("prompt", check.prompt)
    if check.scope != "prompt":  # (a prompt check's item is None: the prompt itself)
        for i, item in enumerate(check.items):
            _check_text("answer" if check.scope == "answer" else f"docs[{i}]", item)
    check_meta(opts.tags, opts.run_name)


def retrieved(value: Any, k: int | None) -> list[str]:
    """A retriever's result as a list of str (items converted with ``str``)."""
    name = "retriever result"
    if isinstance(value, str | bytes | bytearray) or not isinstance(value, Iterable):
        raise GuardInputError(
            name, f"the retriever must return a list of documents, got {type(value).__name__}"
        )
    docs = [_check_text(f"{name}[{i}]", str(d)) for i, d in enumerate(value)]
    return docs[:k] if k else docs
