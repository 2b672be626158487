"""Cache keys: ``namespace:sha256`` of everything a score depends on (:func:`make_key`)."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping
from typing import Any

#: v2: keys are computed on the exact text (v1 collapsed whitespace, unlike the scorer).
_KEY_FORMAT = "ssd-guard/score-key/v2"


def normalise_text(text: str) -> str:
    """Unicode NFC, strip, collapse runs of whitespace to one space; case is kept.

    Not used for cache keys: the scorer sees the exact text, so :func:`make_key` does too
    (two texts that differ only in whitespace can score differently)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def make_key(
    namespace: str,
    *,
    student_fingerprint: str,
    model_id: str,
    layer: int,
    prompt: str,
    answer: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """``f"{namespace}:" + sha256`` of a canonical JSON encoding of everything a score
    depends on. The prompt (and answer) are keyed on their exact text -- the text the
    scorer sees -- so prompts that differ in whitespace or Unicode normalisation never
    share an entry; ``answer=None`` (a prompt-level entry) and ``answer=""`` give different
    keys. *extra* (JSON-able) separates entries that differ in anything else (e.g. a
    scorer option)."""
    payload = [
        _KEY_FORMAT,
        str(student_fingerprint),
        str(model_id),
        int(layer),
        str(prompt),
        None if answer is None else str(answer),
        None if extra is None else dict(extra),
    ]
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return f"{namespace}:{hashlib.sha256(encoded.encode('utf-8')).hexdigest()}"
