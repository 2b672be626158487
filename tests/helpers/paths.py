"""Where things are, for tests wherever they sit under ``tests/``."""

from __future__ import annotations

from pathlib import Path

#: The repository root.
ROOT = Path(__file__).resolve().parents[2]
#: The ``tests/`` directory.
TESTS = ROOT / "tests"
#: Small data files the tests read (TriviaQA and ARC excerpts).
DATA = TESTS / "data"
#: Invalid policies, each with the error it must give (``INDEX.txt``).
BAD_POLICIES = TESTS / "policies_bad"
#: The runnable examples.
EXAMPLES = ROOT / "examples"
