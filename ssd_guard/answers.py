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
import string
from typing import Any

__all__ = [
    "answer_core",
    "chat_prompt",
    "core_span",
    "grade_choice",
    "normalise_answer",
    "normalize_answer",
    "question_of",
    "question_stem",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lower case, no punctuation, articles or extra spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


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


_CHOICE_LINE = re.compile(r"^\s*(?:Choices\s*:|\(?[A-H][.)]\s)", re.IGNORECASE)


_CHOICE_PICK = re.compile(r"^\(?[A-H][.)](?:\s|$)")


def question_stem(question: str) -> str:
    """The question without its lettered choice lines (``A. ...`` / ``Choices:``)."""
    lines = question.splitlines()
    for i, line in enumerate(lines):
        if i and _CHOICE_LINE.match(line):
            return "\n".join(lines[:i]).strip()
    return question.strip()


def answer_core(question: str, answer: str) -> str:
    """What an answer says beyond restating its question: the normalised answer's core
    span (two words or more), else the normalised answer. "The capital of Italy is Rome."
    and "Rome" both give "Rome" for "What is the capital of Italy?"; chat students embed
    this on both sides (artifact ``answers.core_embed``)."""
    norm = normalise_answer(answer)
    if _CHOICE_PICK.match(norm):  # "B. hat shop": a pick among choices is its own content
        return norm
    core = core_span(question_stem(question), norm, min_words=2)
    return core or norm


def chat_prompt(tokenizer: Any, question: str, system: str | None = None) -> str:
    """The text a chat model sees for one user *question*: the tokenizer's chat template
    with an optional *system* message and the assistant turn opened."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; use a few-shot recipe instead")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_LEAD_LETTER = re.compile(
    r"^\W*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|would\s+be)?\s*:?\s*)?"
    r"\(?([A-H])(?:[.):]|\s*$|\s+[-–])"
)
_LISTED = re.compile(r"^\s*\(?([A-H])[.)]\s", re.MULTILINE)
_ANY_LETTER = re.compile(r"\b(?:answer|option|choice)\s*(?:is\s*)?:?\s*\(?([A-H])\b(?!['’])")


def grade_choice(answer: str, choices: list[str] | tuple[str, ...], lettered: bool) -> int | None:
    """The index of the choice a free-text *answer* picks, or ``None`` when it picks none
    or several. Yes/no sets: the first "yes" / "no". Lettered sets: a leading letter
    ("B.", "(B)", "The answer is B"), else the one choice text the answer contains."""
    text = answer.strip()
    listed = {m.group(1) for m in _LISTED.finditer(text)}
    if lettered and len(listed) > 1:  # the answer repeats the choice list: it picks none
        return None
    if [c.lower() for c in choices] == ["yes", "no"]:
        m = _YES_NO.search(text)
        return None if m is None else (0 if m.group(1).lower() == "yes" else 1)
    if lettered:
        m = _LEAD_LETTER.match(text) or _ANY_LETTER.search(text)
        if m is not None:
            k = ord(m.group(1)) - ord("A")
            return k if k < len(choices) else None
    norm = f" {normalize_answer(text)} "
    hits = [i for i, c in enumerate(choices) if f" {normalize_answer(c)} " in norm]
    if len(hits) > 1:  # "department store" contains "store": keep the longest match
        longest = max(hits, key=lambda i: len(choices[i]))
        if all(normalize_answer(choices[i]) in normalize_answer(choices[longest]) for i in hits):
            return longest
        return None
    return hits[0] if hits else None
