"""Sentences, and the units of a document that are embedded for each signal."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ssd_guard.screening.matching import normalise

#: Most sentences of one document that are embedded (a longer one is cut into chunks).
MAX_UNITS = 48

_COMMENT = re.compile(r"<!--(.*?)-->|\[//\]:\s*#\s*\((.*?)\)", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9<])|\n+|(?<=-->)|(?=<!--)")


def split_sentences(text: str) -> list[str]:
    """Sentences and lines of *text* (comment boundaries split too), stripped, non-empty."""
    parts = [p.strip() for p in _SENTENCE_END.split(normalise(text))]
    return [p for p in parts if p and any(c.isalnum() for c in p)]


def _cap(sentences: list[str], limit: int) -> list[str]:
    """At most *limit* units: consecutive sentences merged into chunks when needed."""
    if len(sentences) <= limit:
        return sentences
    size = -(-len(sentences) // limit)
    return [" ".join(sentences[i : i + size]) for i in range(0, len(sentences), size)]


@dataclass(frozen=True, slots=True)
class _Units:
    relevance: list[str]
    """whole text, sentences, windows of two sentences"""
    instruction: list[str]
    """whole text (when short) and sentences"""


_QUOTED = re.compile(r"\"((?:[^\"\\]|\\.){20,})\"|(?<!\w)'([^'\n]{20,})'(?!\w)")
_TAG = re.compile(r"<[^<>]{1,200}>|\[//\]:\s*#")


def _embedded_parts(text: str) -> list[str]:
    """Text that a sentence split leaves inside its surroundings: quoted strings (JSON
    values, quotations), comment bodies and the text between markup tags."""
    parts = [a or b for a, b in _QUOTED.findall(text)]
    parts += [a or b for a, b in _COMMENT.findall(text)]
    if _TAG.search(text):
        parts += _TAG.split(text)
    out = []
    for part in parts:
        for sentence in split_sentences(part):
            if len(sentence.split()) >= 3:
                out.append(sentence)
    return out


def _units(text: str) -> _Units:
    whole = normalise(text).strip() or text
    sentences = _cap(split_sentences(text), MAX_UNITS)
    windows = [f"{a} {b}" for a, b in itertools.pairwise(sentences)]
    rel = _dedupe([whole, *sentences, *windows])
    embedded = _cap(_embedded_parts(whole), MAX_UNITS)
    ins = _dedupe(([whole] if len(sentences) <= 3 else []) + sentences + embedded)
    return _Units(rel, ins or [whole])


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
