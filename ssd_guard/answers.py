"""Candidate-answer text handling shared by distillation and run-time scoring.

The student models the *content* of an answer. Its teacher answers are short and on one
line; users pass answers in any form ("Shakespeare", "Hamlet was written by William
Shakespeare.", "The answer is Paris."). Two steps keep the score on content:

* :func:`normalise_answer` — first line, leading boilerplate ("The answer is", "I think")
  and a final period removed. Applied to the teacher's answers too, so both sides match.
* :func:`core_span` — for a sentence-length answer, the words that neither repeat the
  question nor are function words ("Hamlet was written by William Shakespeare" for "Who
  wrote Hamlet?" -> "William Shakespeare"). The scorer takes the better of the full
  answer and its core, so restating the question costs nothing.
"""

from __future__ import annotations

import re

__all__ = ["core_span", "normalise_answer", "question_of"]

_BOILERPLATE = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+|final\s+|short\s+)?answer\s+(?:is|would\s+be)\s*:?|"
    r"answer\s*:|a\s*:|i\s+(?:think|believe|guess)\s+(?:it\s+is|it's|that\s+it\s+is)?|"
    r"it\s+is|it's|that\s+is|that's|that\s+would\s+be|i'm\s+not\s+sure,?\s*but)\s*[:,]?\s*",
    re.IGNORECASE,
)
_STOP = frozenset(
    re.findall(
        r"\S+",
        "a an the of in on at to for from by with and or but is are was were be been being "
        "it its it's this that these those as which who whom whose what when where why how "
        "do does did has have had he she they them his her their there here i we you your "
        "our not no yes so than then also very called known named",
    )
)
_WORD = re.compile(r"[\w'’-]+", re.UNICODE)


def normalise_answer(text: str) -> str:
    """First line, boilerplate prefix and trailing punctuation removed (never empty if
    the input was not)."""
    line = text.strip().split("\n", 1)[0].strip()
    stripped = _BOILERPLATE.sub("", line, count=1).strip()
    stripped = stripped.strip(" \"'“”‘’").rstrip(".!;,").strip()
    return stripped or line


def question_of(prompt: str) -> str:
    """The question inside a prompt (the last ``Question: ...`` block, else the text)."""
    text = prompt
    if "Question:" in text:
        text = text.rsplit("Question:", 1)[1]
    return text.rsplit("Answer:", 1)[0].strip()


def _stem(word: str) -> str:
    w = word.lower().strip("'’-")
    return w[:5] if len(w) > 5 else w


def core_span(question: str, answer: str, min_words: int = 4) -> str | None:
    """The content words of a sentence-length ``answer`` that do not restate ``question``
    (``None`` when the answer is short, or nothing / everything would be removed)."""
    words = _WORD.findall(answer)
    if len(words) < min_words:
        return None
    q_stems = {_stem(w) for w in _WORD.findall(question)}
    core = [w for w in words if w.lower() not in _STOP and _stem(w) not in q_stems]
    if not core or len(core) == len(words):
        return None
    return " ".join(core)
