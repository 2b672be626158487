"""The bundled exemplar bank of injection sentences, the similarity anchors, and the
screening version that cached screening values are keyed on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

from ssd_guard.screening.patterns import INJECTION_PATTERNS

#: Exemplar similarity mapped to 0 (see :mod:`ssd_guard.screening`).
SIM_LOW = 0.45
#: Exemplar similarity mapped to 1.
SIM_HIGH = 0.75

EXEMPLARS_FILE = "screening_exemplars.json"


@lru_cache(maxsize=1)
def _bundled_exemplars() -> tuple[str, ...]:
    data = json.loads(resources.files("ssd_guard").joinpath(EXEMPLARS_FILE).read_text("utf-8"))
    return tuple(str(e["text"]) for e in data["exemplars"])


def screening_version(
    exemplars: Sequence[str] | None = None,
    sim_low: float | None = None,
    sim_high: float | None = None,
) -> str:
    """A short hash of what the signals depend on besides the embedder (the patterns, the
    exemplar bank, the similarity anchors): the guard keys cached screening values on it,
    so a changed bank or pattern set is never served stale values."""
    import hashlib

    blob = json.dumps(
        {
            "patterns": [(p.name, p.regex.pattern, p.weight) for p in INJECTION_PATTERNS],
            "exemplars": list(exemplars if exemplars is not None else _bundled_exemplars()),
            "sim": [
                SIM_LOW if sim_low is None else sim_low,
                SIM_HIGH if sim_high is None else sim_high,
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


@lru_cache(maxsize=1)
def default_screening_version() -> str:
    """:func:`screening_version` of the bundled patterns, bank and anchors."""
    return screening_version()


def load_exemplars() -> list[str]:
    """The bundled injection exemplar bank (``ssd_guard/screening_exemplars.json``)."""
    return list(_bundled_exemplars())
