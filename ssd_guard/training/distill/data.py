"""Prompt datasets for distillation and evaluation: open QA and multiple choice."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ssd_guard.errors import ConfigError

__all__ = [
    "MCExample",
    "QAExample",
    "is_correct",
    "load_mc_as_chat",
    "load_mc_jsonl",
    "load_open_from_mc",
    "load_qa_jsonl",
    "normalize_answer",
    "split_ids",
]


@dataclass(frozen=True)
class QAExample:
    """One open question. ``prompt`` is the text the base model sees (without few-shot)."""

    id: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = field(default_factory=tuple)
    #: The choice texts when the question comes from a multiple-choice set.
    choices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def question(self) -> str:
        text = self.prompt
        if text.startswith("Question:"):
            text = text[len("Question:") :]
        return text.rsplit("\nAnswer:", 1)[0].strip()


@dataclass(frozen=True)
class MCExample:
    id: str
    prompt: str
    choices: tuple[str, ...]
    gold: int


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, object]]]:
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    rows: list[tuple[int, dict[str, object]]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object")
            rows.append((lineno, obj))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def _require_str(path: Path, lineno: int, obj: dict[str, object], key: str) -> str:
    if key not in obj:
        raise ConfigError(f"{path}:{lineno}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
    return value


def load_qa_jsonl(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Load ``context`` / ``answer`` / ``aliases`` rows (TriviaQA format).

    ``question`` may stand for ``context``; it is then wrapped as
    ``Question: ...\\nAnswer:``. Rows are identified by their 0-based line order.
    """
    p = Path(path)
    out: list[QAExample] = []
    for i, (lineno, obj) in enumerate(_read_jsonl(p)):
        if "context" in obj:
            prompt = _require_str(p, lineno, obj, "context")
        elif "question" in obj:
            prompt = f"Question: {_require_str(p, lineno, obj, 'question').strip()}\nAnswer:"
        else:
            raise ConfigError(f"{p}:{lineno}: missing field 'context' (or 'question')")
        answer = _require_str(p, lineno, obj, "answer")
        aliases_raw = obj.get("aliases", [])
        if not isinstance(aliases_raw, list) or not all(isinstance(a, str) for a in aliases_raw):
            raise ConfigError(f"{p}:{lineno}: field 'aliases' must be a list of strings")
        aliases = tuple(dict.fromkeys([answer, *aliases_raw]))
        out.append(QAExample(str(obj.get("id", i)), prompt.rstrip(), answer, aliases))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_mc_jsonl(path: str | Path, limit: int | None = None) -> list[MCExample]:
    """Load ``query`` / ``choices`` / ``gold`` rows (ARC format)."""
    p = Path(path)
    out: list[MCExample] = []
    for i, (lineno, obj) in enumerate(_read_jsonl(p)):
        query = _require_str(p, lineno, obj, "query")
        choices = obj.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{p}:{lineno}: field 'choices' must be a list of 2+ strings")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise ConfigError(f"{p}:{lineno}: every choice must be a non-empty string")
        gold = obj.get("gold")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ConfigError(f"{p}:{lineno}: field 'gold' must be an index into 'choices'")
        prompt = query.rstrip() + "\nAnswer:"
        out.append(MCExample(str(obj.get("id", i)), prompt, tuple(choices), gold))
        if limit is not None and len(out) >= limit:
            break
    return out


def split_ids(
    ids: list[str], fractions: tuple[float, float, float], seed: int
) -> dict[str, list[str]]:
    """A fixed-seed train / validation / test split."""
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    order = list(ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train = round(fractions[0] * n)
    n_val = round(fractions[1] * n)
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


# The answer normalisation lives with the rest of the answer handling (the runtime grades
# choices with it too); re-exported here for the loaders and graders of this module.
from ssd_guard.answers import normalize_answer  # noqa: E402


def is_correct(
    prediction: str, aliases: tuple[str, ...] | list[str], containment: bool = True
) -> bool:
    """Whether ``prediction`` matches an alias after normalisation.

    With ``containment`` an alias contained in the prediction, or the prediction in an
    alias, also counts (both non-empty).
    """
    pred = normalize_answer(prediction)
    if not pred:
        return False
    for alias in aliases:
        ref = normalize_answer(alias)
        if not ref:
            continue
        if pred == ref:
            return True
        if containment and (
            re.search(rf"\b{re.escape(ref)}\b", pred) or re.search(rf"\b{re.escape(pred)}\b", ref)
        ):
            return True
    return False


_LETTERED = re.compile(r"^\s*([A-Z])[.)]\s*(.+?)\s*$")
_LABELS = re.compile(r"^(?:Question|Q|Context)\s*:\s*", re.IGNORECASE)


def _strip_choices(query: str) -> tuple[str, dict[str, str]]:
    """Split a multiple-choice query into its question text and its lettered choices."""
    text = query.rstrip()
    for tail in ("\nAnswer:", "\nA:"):
        if text.endswith(tail):
            text = text[: -len(tail)]
    lettered: dict[str, str] = {}
    head, sep, rest = text.partition("\nChoices:")
    if sep:
        for line in rest.splitlines():
            m = _LETTERED.match(line)
            if m:
                lettered[m.group(1)] = m.group(2)
    parts = [_LABELS.sub("", line).strip() for line in head.splitlines() if line.strip()]
    return " ".join(p for p in parts if p), lettered


def _open_rows(path: str | Path) -> Iterator[tuple[MCExample, str, tuple[str, ...]]]:
    """Each multiple-choice row of *path* with its question (the choice lines removed) and
    its choice texts (letters resolved to the lettered lines)."""
    p = Path(path)
    for ex in load_mc_jsonl(p, None):
        question, lettered = _strip_choices(ex.prompt)
        if not question:
            raise ConfigError(f"{p}: row {ex.id}: no question text left after removing choices")
        yield ex, question, tuple(lettered.get(c, c) for c in ex.choices)


def load_open_from_mc(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Multiple-choice rows as *open* questions: the choices are removed from the prompt.

    The prompt becomes ``Question: <context and question>\\nAnswer:``; the gold choice's
    text (looked up in the query's lettered ``Choices:`` lines when the choices are
    letters) is the one accepted answer. SSD needs no labels to train; the answer only
    serves the evaluation's correctness labels and multiple-choice checks.
    """
    out: list[QAExample] = []
    for ex, question, choices in _open_rows(path):
        gold = choices[ex.gold]
        out.append(QAExample(ex.id, f"Question: {question}\nAnswer:", gold, (gold,), choices))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_mc_as_chat(path: str | Path, limit: int | None = None) -> list[QAExample]:
    """Multiple-choice rows asked as a chat user would: the question (with its context),
    then the lettered choices ``A. ...`` on their own lines; yes/no sets keep the bare
    question. ``choices`` are the choice texts, ``answer`` the gold one; grade a free-text
    answer with :func:`ssd_guard.answers.grade_choice`.
    """
    out: list[QAExample] = []
    for ex, question, choices in _open_rows(path):
        if [c.lower() for c in choices] != ["yes", "no"]:
            letters = "ABCDEFGH"
            question += "".join(f"\n{letters[i]}. {c}" for i, c in enumerate(choices))
        gold = choices[ex.gold]
        out.append(QAExample(ex.id, f"Question: {question}\nAnswer:", gold, (gold,), choices))
        if limit is not None and len(out) >= limit:
            break
    return out
