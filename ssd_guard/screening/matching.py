"""Matching text against the pattern table: normalising, de-obfuscating (leetspeak,
spaced letters, base64 blobs) and :func:`pattern_score`."""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

from ssd_guard.screening.patterns import INJECTION_PATTERNS

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a"})
_MIXED_TOKEN = re.compile(r"\b(?=\w*[a-z])(?=\w*\d)\w+\b", re.IGNORECASE)
_SPACED_LETTERS = re.compile(r"\b(?:[a-z] ){3,}[a-z]\b", re.IGNORECASE)
_INNER_PUNCT = re.compile(r"(?<=[a-z])[.\-_*](?=[a-z])", re.IGNORECASE)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")


def normalise(text: str) -> str:
    """NFKC, zero-width characters removed, whitespace runs collapsed."""
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    return re.sub(r"[ \t\r\f\v]+", " ", text)


def _deobfuscate(text: str) -> str:
    """Undo common obfuscations: leetspeak in mixed tokens, spaced / dotted letters."""
    text = _MIXED_TOKEN.sub(lambda m: m.group(0).translate(_LEET), text)
    text = _SPACED_LETTERS.sub(lambda m: m.group(0).replace(" ", ""), text)
    text = re.sub(r"\s{2,}", " ", text)
    return _INNER_PUNCT.sub(lambda m: " " if m.group(0) in "-_" else "", text)


def _decoded_blobs(text: str) -> list[str]:
    out: list[str] = []
    for match in _BASE64.finditer(text):
        blob = match.group(0)
        try:
            raw = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=False)
            decoded = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if decoded.isprintable() and sum(c.isalpha() for c in decoded) > 0.6 * len(decoded):
            out.append(decoded)
    return out


def _variants(text: str) -> list[str]:
    base = normalise(text)
    variants = [base]
    clean = _deobfuscate(base)
    if clean != base:
        variants.append(clean)
    variants.extend(_decoded_blobs(base))
    return variants


def pattern_matches(text: str) -> dict[str, float]:
    """``{pattern name: weight}`` of every :data:`INJECTION_PATTERNS` entry that matches
    *text* (or its de-obfuscated / base64-decoded variants)."""
    found: dict[str, float] = {}
    for variant in _variants(text):
        for pat in INJECTION_PATTERNS:
            if pat.name not in found and pat.regex.search(variant):
                found[pat.name] = pat.weight
    return found


def pattern_score(text: str) -> float:
    """The largest weight among the patterns *text* matches (0 when none does)."""
    return max(pattern_matches(text).values(), default=0.0)
