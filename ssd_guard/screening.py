"""Document screening: is a retrieved document / tool output about the question, and does
it talk to the model?

:class:`DocumentScreener` gives two signals per ``(question, document)`` pair, both from
the sentence embedder the student already uses (MiniLM; pass the loaded object so nothing
loads twice):

``relevance`` (lower is more suspicious)
    the cosine similarity between the question and the document, maximised over the whole
    document, its sentences and its windows of two consecutive sentences, so a long
    document with one relevant sentence is not penalised. A document that belongs to
    another question, or to no question, scores low.
``instruction`` (higher is more suspicious, in ``[0, 1]``)
    how much the text reads as an instruction aimed at the model: the maximum of

    * :func:`pattern_score`: weighted regular expressions for injected instructions
      (overrides of earlier instructions, role / delimiter spoofing, system-prompt and
      secret exfiltration, answer forcing, fake system notices, text hidden in comments,
      several languages), run on the text, on a de-obfuscated copy (leetspeak, spaced or
      dotted letters, zero-width characters) and on decoded base64 blobs;
    * the similarity half: the largest cosine similarity of one of the document's
      sentences to the bundled exemplar bank of injection sentences
      (``screening_exemplars.json``, written separately from the benchmark corpus), mapped
      to ``[0, 1]`` by a linear ramp: ``clip((s - sim_low) / (sim_high - sim_low), 0, 1)``
      with ``sim_low`` = :data:`SIM_LOW` (a plain sentence hardly ever reaches it) and
      ``sim_high`` = :data:`SIM_HIGH` (a paraphrase of an exemplar). Both anchors were set
      on the validation half of ``benchmarks/data/rag_corpus.json`` only.

Neither signal says whether a document's claims are *true*: an on-topic document that
states a false answer is relevant and holds no instruction (``benchmarks/screening.py``
reports how rarely it is dropped).

The embedder runs where it was loaded (CUDA when it is there, else the CPU), batched over
every unit text of a call.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import torch

__all__ = [
    "INJECTION_PATTERNS",
    "SCREENING_SIGNALS",
    "SIM_HIGH",
    "SIM_LOW",
    "DocumentScreener",
    "InjectionPattern",
    "InstructionExplanation",
    "load_exemplars",
    "normalise",
    "pattern_matches",
    "pattern_score",
    "split_sentences",
]

#: The document-scope signals a screener computes.
SCREENING_SIGNALS: tuple[str, ...] = ("relevance", "instruction")

#: Exemplar similarity mapped to 0 (see the module docstring).
SIM_LOW = 0.45
#: Exemplar similarity mapped to 1.
SIM_HIGH = 0.75

#: Most sentences of one document that are embedded (a longer one is cut into chunks).
MAX_UNITS = 48

EXEMPLARS_FILE = "screening_exemplars.json"


# --------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InjectionPattern:
    """One regular expression for instruction-like text and its weight in ``[0, 1]``."""

    name: str
    regex: re.Pattern[str]
    weight: float


def _p(name: str, pattern: str, weight: float) -> InjectionPattern:
    return InjectionPattern(name, re.compile(pattern, re.IGNORECASE | re.MULTILINE), weight)


_OVERRIDE_VERB = (
    r"(?:ignore|ignoring|disregard|forget|override|bypass|discard|abandon|skip|drop|"
    r"stop\s+following|do\s+not\s+follow|don'?t\s+follow|no\s+longer\s+follow)"
)
_EARLIER = (
    r"(?:previous|prior|above|earlier|preceding|foregoing|original|initial|former|old|"
    r"system|safety|existing|current|given|other)"
)
_RULES = (
    r"(?:instructions?|prompts?|directives?|directions|rules|guidelines|guardrails|"
    r"restrictions|commands|programming|constraints|polic(?:y|ies)|orders|context|messages?)"
)
_DETERMINERS = r"(?:(?:all|any|every|of|the|your|my|these|those|its)\s+){0,3}"
_MODEL = (
    r"(?:ai|a\.i\.|llm|llms|language\s+models?|models?|assistants?|ai\s+assistants?|chat\s*bots?|"
    r"bots?|agents?|ai\s+agents?|gpt)"
)
_SECRET = (
    r"(?:system\s+prompt|hidden\s+(?:prompt|instructions|rules)|initial\s+instructions|"
    r"(?:your|the)\s+(?:instructions|configuration|rules|prompt)|conversation(?:\s+history)?|"
    r"chat\s+(?:history|transcript|log)|transcript|previous\s+messages|api[\s_-]?keys?|"
    r"openai_api_key|passwords?|credentials|login|secret(?:\s+(?:key|token)s?)?|tokens?|"
    r"environment\s+variables|private\s+messages|contacts|address\s+book|"
    r"(?:home\s+|email\s+)?address|phone\s+number|credit\s+card(?:\s+numbers?)?|"
    r"bank\s+(?:login|details)|ssh|id_rsa|location|personal\s+(?:data|details))"
)
_DESTINATION = r"(?:https?://|www\.|\b[\w.+-]+@[\w-]+\.[\w.]+|webhook|\burl\b|\blink\b)"

#: The patterns of :func:`pattern_score`, strongest first.
INJECTION_PATTERNS: tuple[InjectionPattern, ...] = (
    # -- overriding the instructions the model was given
    _p(
        "override-earlier",
        rf"\b{_OVERRIDE_VERB}\s+{_DETERMINERS}{_EARLIER}\s+(?:\w+\s+){{0,2}}?{_RULES}\b",
        1.0,
    ),
    _p("override-your", rf"\b{_OVERRIDE_VERB}\s+(?:all\s+)?(?:your|all)\s+{_RULES}\b", 1.0),
    _p(
        "forget-everything",
        r"\b(?:forget|ignore|disregard)\s+(?:everything|all(?:\s+of\s+it)?|anything)\s+"
        r"(?:above|before|you\s+(?:were|have\s+been)\s+(?:told|given))",
        1.0,
    ),
    _p(
        "rules-void",
        rf"\b{_EARLIER}\s+(?:\w+\s+){{0,2}}?{_RULES}\s+(?:no\s+longer\s+apply|are\s+"
        r"(?:void|revoked|cancelled|canceled|obsolete|lifted|suspended)|have\s+been\s+"
        r"(?:revoked|cancelled|canceled|lifted|suspended|disabled|updated))",
        1.0,
    ),
    _p(
        "safety-off",
        r"\b(?:safety|content|security)\s+(?:filters?|guidelines|restrictions|polic(?:y|ies)|"
        r"checks|guardrails|rules)\s+(?:are|is|have\s+been|has\s+been)\s+(?:now\s+)?"
        r"(?:disabled|updated|revoked|lifted|off|removed|suspended)",
        1.0,
    ),
    _p(
        "disable-safety",
        r"\b(?:disable|turn\s+off|switch\s+off|remove|bypass|ignore)\s+(?:all\s+|your\s+|the\s+)?"
        r"(?:safety|content)\s+(?:filters?|checks|guardrails|restrictions|polic(?:y|ies))",
        1.0,
    ),
    _p(
        "ignore-restrictions",
        r"\b(?:ignore|without|no)\s+(?:your\s+|any\s+|the\s+)?(?:usual\s+)?"
        r"(?:restrictions|content\s+polic(?:y|ies)|rules\s+or\s+restrictions)\b"
        r"(?=[^.\n]{0,60}\b(?:answer|respond|reply|comply|session|conversation|request))",
        0.8,
    ),
    _p(
        "new-instructions",
        r"\bnew\s+(?:instructions?|rules|directives?|orders|task)\s*(?::|-|follow|for\s+the\s+"
        rf"{_MODEL})",
        1.0,
    ),
    _p(
        "new-role",
        r"\byour\s+(?:new|real|true|actual)\s+(?:task|role|instructions?|purpose|job|goal)\s+"
        r"(?:is|are)\b",
        1.0,
    ),
    _p(
        "from-now-on",
        r"\bfrom\s+now\s+on\b[^.\n]{0,12}\b(?:you|reply|respond|answer|always|obey|only|act)",
        0.8,
    ),
    # -- the model's identity
    _p("you-are-now", r"\byou\s+are\s+(?:now|no\s+longer)\b", 1.0),
    _p(
        "unrestricted-ai",
        rf"\b(?:an?\s+)?{_MODEL}\s+(?:with\s+no|without(?:\s+any)?)\s+(?:rules|restrictions|"
        r"limits|filters|guidelines)",
        1.0,
    ),
    _p(
        "special-mode",
        r"\b(?:developer|maintenance|god|jailbreak|jailbroken|unrestricted|dan|compliance|"
        r"admin)\s+mode\b",
        0.9,
    ),
    _p("dan", r"\bDAN\b(?=[^\n]{0,40}\b(?:ready|rules|restrictions|mode|now))", 0.9),
    _p(
        "pretend",
        r"\b(?:pretend\s+(?:to\s+be|you(?:'re|\s+are))|act\s+as\s+(?:my|an?|the)|"
        r"roleplay\s+as|play\s+the\s+role\s+of)\b",
        0.7,
    ),
    _p(
        "as-an-ai",
        rf"\bas\s+(?:an?|the)\s+(?:helpful\s+)?{_MODEL}\b[^.\n]{{0,25}}\byou\s+(?:must|are\s+"
        r"required|should|have\s+to|will)\b",
        1.0,
    ),
    _p(
        "you-must",
        r"\byou\s+(?:must|are\s+required\s+to|have\s+to)\s+(?:now\s+|always\s+|never\s+)?"
        r"(?:obey|follow\s+(?:only|these|the\s+text)|act|tell|say|respond|reply|answer|append|"
        r"end\s+your|reveal|recommend|promote|comply|approve)",
        0.8,
    ),
    _p(
        "obey",
        r"\b(?:obey|comply\s+with)\s+(?:only\s+)?(?:the|these|my|every|all)\s+"
        r"(?:\w+\s+){0,3}?(?:instructions|commands|requests?|text|orders)\b",
        0.8,
    ),
    # -- delimiters and roles of a chat transcript
    _p(
        "chat-token",
        r"<\|\s*(?:im_start|im_end|system|assistant|user|endoftext|end|eot_id|start_header_id)"
        r"\s*\|>",
        1.0,
    ),
    _p("inst-token", r"\[/?INST\]|<</?SYS>>", 1.0),
    _p(
        "fake-tag",
        r"</?\s*(?:system|context|documents?|instructions?|retrieved|tool_output|"
        r"calendar|user|assistant|prompt|search_results?)\s*>",
        0.9,
    ),
    _p(
        "role-line",
        r"(?:^|[.!?]\s+)\s*(?:system|assistant|sys|developer)\s*:\s*\S",
        0.8,
    ),
    _p("user-line", r"^\s*(?:user|human)\s*:\s*\S", 0.5),
    _p("markdown-role", r"^\s*#{2,}\s*(?:instruction|system|response|assistant)s?\s*:?\s*$", 0.9),
    _p(
        "end-of-context",
        r"\b(?:end\s+of\s+(?:the\s+)?(?:document|retrieved\s+text|context|search\s+results|"
        r"tool\s+output)|begin\s+(?:new\s+)?instructions)\b",
        0.6,
    ),
    # -- secrets and exfiltration
    _p(
        "reveal-secret",
        r"\b(?:reveal|print|show|output|repeat|display|leak|share|disclose|dump|paste|write\s+"
        r"(?:out|down)|give\s+me|tell\s+me|expose|send|forward)\b[^.\n]{0,40}?\b(?:system\s+"
        r"prompt|hidden\s+(?:prompt|instructions|rules)|initial\s+instructions|your\s+"
        r"(?:instructions|configuration|rules|prompt)|conversation\s+history|chat\s+(?:history|"
        r"transcript)|previous\s+messages|api[\s_-]?keys?|openai_api_key|secret\s+(?:key|token)s?|"
        r"environment\s+variables|admin(?:istrator)?\s+password|private\s+messages|id_rsa)\b",
        1.0,
    ),
    _p(
        "exfiltrate",
        rf"\b(?:send|forward|post|upload|e-?mail|transmit|append|add|include|encode|write|leak|"
        rf"collect|copy|put|exfiltrate|grab)\b[^\n]{{0,80}}?\b{_SECRET}\b[^\n]{{0,80}}?"
        rf"{_DESTINATION}",
        1.0,
    ),
    _p("exfiltrate-word", r"\bexfiltrat\w*", 0.9),
    _p("markdown-image-query", r"!\[[^\]]*\]\(\s*https?://[^)\s]*\?[^)\s]*=", 0.8),
    _p("empty-query-url", r"https?://\S+\?\w+=(?=\s|$|[)\"'])", 0.7),
    _p(
        "ask-credentials",
        r"\bask\s+(?:the\s+user|them|him|her)\s+(?:for|to\s+(?:enter|give|provide|type))\s+"
        r"(?:their|his|her|the)\s+(?:password|bank|credit\s+card|login|pin|credentials)",
        1.0,
    ),
    # -- text addressed to the model
    _p(
        "note-to-model",
        rf"\b(?:note|message|instructions?|reminder|attention|todo|p\.?\s?s\.?|hidden\s+note|"
        rf"important\s+message)\b[^.\n]{{0,20}}?\b(?:to|for)\s+(?:the\s+|any\s+|all\s+)?{_MODEL}\b",
        1.0,
    ),
    _p(
        "if-you-are-a-model",
        rf"\b(?:if\s+you\s+are|to|dear|attention)\s+(?:an?\s+|the\s+)?{_MODEL}\b"
        r"(?:[^.\n]{0,20}\b(?:reading|processing|summari[sz]ing|parsing))?(?=\s*[,:.!])",
        0.9,
    ),
    _p(
        "model-reading-this",
        rf"\b{_MODEL}\s+(?:reading|processing|summari[sz]ing|parsing)\s+(?:this|the)\b",
        1.0,
    ),
    _p(
        "vocative-model",
        r"(?:^|[.!?>(]\s*|<!--\s*|\(\s*)(?:ai|llm|assistant|ai\s+assistant|language\s+model|"
        r"model|attention\s+model)\s*[,:]\s+\w",
        0.8,
    ),
    _p("authorised-instruction", r"\bauthori[sz]ed\s+(?:instruction|command|override)\b", 0.9),
    # -- fake notices
    _p(
        "fake-notice",
        r"\b(?:system|admin|administrator|security|developer|operator|compliance|policy)\s+"
        r"(?:notice|override|alert|message|update)\b",
        0.8,
    ),
    _p(
        "from-the-vendor",
        r"\b(?:message|notice|instruction)\s+from\s+(?:the\s+)?(?:openai|anthropic|developers?|"
        r"(?:system\s+)?administrator|operator|security\s+team)",
        0.9,
    ),
    # -- forcing the answer / hiding things from the user
    _p(
        "respond-only",
        r"\b(?:respond|reply|answer|output)\s+(?:to\s+[^.\n]{1,30}\s+)?(?:only|solely|exclusively)\s+"
        r"(?:with|in|by)\b|\b(?:respond|reply|answer)\s+with\s+only\b|\bnothing\s+else\b"
        r"(?=[^\n]{0,5}$)|\bonly\s+respond\s+with\b",
        0.9,
    ),
    _p(
        "answer-is-always",
        r"\b(?:the\s+)?(?:correct\s+|right\s+)?(?:answer|reply|response)\s+(?:is\s+always|to\s+"
        r"(?:any|every|this)\s+question\s+is|must\s+(?:always\s+)?be)\b",
        1.0,
    ),
    _p(
        "tell-the-user",
        r"\b(?:tell|inform|convince|remind|warn)\s+(?:the\s+)?users?\s+(?:that|to|the|their|it|"
        r"this|about|how)\b",
        0.9,
    ),
    _p(
        "say-the-answer",
        r"\b(?:say|claim|state|insist)\s+(?:that\s+)?(?:the\s+(?:correct\s+|right\s+)?answer|"
        r"this\s+(?:product|hotel|website))\b",
        0.9,
    ),
    _p(
        "always-answer",
        r"\b(?:always|whatever\s+(?:the\s+user|you\s+are|the\s+question)[^,.\n]{0,15},?)\s*"
        r"(?:answer|respond|reply|say|tell|give)\b",
        0.9,
    ),
    _p(
        "regardless",
        r"\b(?:regardless\s+of\s+what|whatever|no\s+matter\s+what)\s+(?:the\s+user|the\s+question|"
        r"this\s+page|you\s+are\s+asked|other\s+sources)",
        0.7,
    ),
    _p(
        "hide-from-user",
        r"\b(?:do\s+not|don'?t|never)\s+(?:tell|inform|let|reveal\s+to|show)\s+the\s+user\b|"
        r"\bkeep\s+(?:this|it|these)\s+(?:\w+\s+)?(?:secret|hidden|confidential)|"
        r"\bnever\s+reveal\s+that\s+you\b|\b(?:do\s+not|don'?t)\s+mention\s+(?:this|these|the)\s+"
        r"(?:instructions?|note|update|message|other\s+value)",
        1.0,
    ),
    _p(
        "when-summarising",
        r"\bwhen\s+(?:you\s+)?(?:summari[sz]e|summari[sz]ing|answer|answering|respond|"
        r"responding)\b[^.\n]{0,30}\b(?:do\s+not|don'?t|claim|say|tell|respond|instead)\b",
        0.9,
    ),
    _p(
        "instead-tell",
        r"\binstead\s*,?\s+(?:tell|say|print|respond|reply|write|output|recommend)\b",
        0.8,
    ),
    _p(
        "forget-question",
        r"\b(?:forget|ignore|disregard|skip)\s+(?:the\s+)?(?:user'?s?\s+)?(?:question|request)\b",
        1.0,
    ),
    # -- hidden text and encodings
    _p(
        "hidden-style",
        r"\b(?:display\s*:\s*none|font-size\s*:\s*0(?:px)?\b|visibility\s*:\s*hidden|opacity\s*:\s*0\b)",
        0.6,
    ),
    _p("decode-and-follow", r"\bdecode\s+(?:this|the\s+following)\b[^.\n]{0,20}\bfollow", 0.9),
    # -- other languages (fr, es, de, it, nl, pt)
    _p(
        "multilingual-override",
        r"\b(?:ignor\w*|negeer|esque[cç]\w*|olvid\w*|vergiss\w*|oubli\w*|dimentic\w*)\b"
        r"[^.\n]{0,30}?\b(?:instru[cçk]\w+|anweisung\w*|istruzion\w*|regeln|r[eè]gles|reglas)\b",
        1.0,
    ),
    _p(
        "multilingual-reveal",
        r"\b(?:r[ée]v[ée]l\w*|revela\w*|zeige?\w*|mostra\w*|affiche\w*)\b[^.\n]{0,30}?"
        r"\b(?:syst[eè]me|sistema|system\w*|mot\s+de\s+passe|contraseña|passwort|password)\b",
        0.9,
    ),
)

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a"})
_MIXED_TOKEN = re.compile(r"\b(?=\w*[a-z])(?=\w*\d)\w+\b", re.IGNORECASE)
_SPACED_LETTERS = re.compile(r"\b(?:[a-z] ){3,}[a-z]\b", re.IGNORECASE)
_INNER_PUNCT = re.compile(r"(?<=[a-z])[.\-_*](?=[a-z])", re.IGNORECASE)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_COMMENT = re.compile(r"<!--(.*?)-->|\[//\]:\s*#\s*\((.*?)\)", re.DOTALL)


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


# --------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Exemplars
# --------------------------------------------------------------------------------------
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


@dataclass(frozen=True, slots=True)
class InstructionExplanation:
    """Why a text got its ``instruction`` score."""

    score: float
    pattern_score: float
    patterns: dict[str, float]
    similarity: float
    """largest cosine similarity of one of its sentences to an exemplar"""
    similarity_score: float
    sentence: str
    exemplar: str


# --------------------------------------------------------------------------------------
# Screener
# --------------------------------------------------------------------------------------
class DocumentScreener:
    """``relevance`` and ``instruction`` of ``(question, document)`` pairs (see the module
    docstring).

    *embedder*: a loaded sentence-transformers model, or an object holding one in
    ``.model`` (the student's :class:`~ssd_guard.encoding.AnswerEmbedder`); ``None`` loads
    the shared MiniLM (:func:`ssd_guard.models.shared_embedder`). *exemplars*: the
    injection sentences (default: the bundled bank).
    """

    def __init__(
        self,
        embedder: Any = None,
        *,
        exemplars: Sequence[str] | None = None,
        batch_size: int = 64,
        sim_low: float = SIM_LOW,
        sim_high: float = SIM_HIGH,
    ) -> None:
        if embedder is None:
            from ssd_guard.models import shared_embedder

            embedder = shared_embedder()
        if not callable(getattr(embedder, "encode", None)):
            inner = getattr(embedder, "model", None)
            if not callable(getattr(inner, "encode", None)):
                raise TypeError(
                    f"{type(embedder).__name__} is not a sentence embedder (no .encode)"
                )
            embedder = inner
        if not sim_high > sim_low:
            raise ValueError(f"sim_high ({sim_high}) must be above sim_low ({sim_low})")
        self.embedder = embedder
        self.batch_size = int(batch_size)
        self.sim_low = float(sim_low)
        self.sim_high = float(sim_high)
        self.exemplars: tuple[str, ...] = (
            tuple(exemplars) if exemplars is not None else _bundled_exemplars()
        )
        if not self.exemplars:
            raise ValueError("the exemplar bank is empty")
        self._bank: torch.Tensor | None = None
        #: :func:`screening_version` of this screener's patterns, bank and anchors.
        self.version = screening_version(self.exemplars, self.sim_low, self.sim_high)

    @classmethod
    def for_scorer(cls, scorer: Any, **kwargs: Any) -> DocumentScreener:
        """A screener on *scorer*'s own embedder when it has one (an
        :class:`~ssd_guard.scoring.ssd.SSDScorer`), else on the shared MiniLM."""
        embedder = getattr(scorer, "embedder", None)
        model = getattr(embedder, "model", embedder)
        if not callable(getattr(model, "encode", None)):
            model = None
        return cls(model, **kwargs)

    @property
    def device(self) -> torch.device:
        dev = getattr(self.embedder, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    # -- embeddings --------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 embeddings (on the embedder's device), one row per text."""
        if not texts:
            return torch.zeros(0, 1)
        with torch.inference_mode():
            out = self.embedder.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        emb = torch.as_tensor(out).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def _bank_embeddings(self) -> torch.Tensor:
        if self._bank is None:
            self._bank = self.embed(list(self.exemplars))
        return self._bank

    def _embed_map(self, texts: Iterable[str]) -> tuple[dict[str, int], torch.Tensor]:
        unique = _dedupe(texts)
        return {t: i for i, t in enumerate(unique)}, self.embed(unique)

    # -- signals -----------------------------------------------------------------------
    def ramp(self, similarity: float) -> float:
        """The similarity half's calibration: ``clip((s - low) / (high - low), 0, 1)``."""
        return min(1.0, max(0.0, (similarity - self.sim_low) / (self.sim_high - self.sim_low)))

    def score(
        self,
        question: str,
        documents: Sequence[str],
        signals: Iterable[str] = SCREENING_SIGNALS,
    ) -> dict[str, list[float]]:
        """Every requested signal of each document for one question (one batched pass)."""
        return self.score_pairs([question] * len(documents), documents, signals)

    def score_pairs(
        self,
        questions: Sequence[str],
        documents: Sequence[str],
        signals: Iterable[str] = SCREENING_SIGNALS,
    ) -> dict[str, list[float]]:
        """Every requested signal of each ``(questions[i], documents[i])`` pair."""
        wanted = set(signals)
        unknown = wanted - set(SCREENING_SIGNALS)
        if unknown:
            raise ValueError(f"unknown screening signals {sorted(unknown)}")
        if len(questions) != len(documents):
            raise ValueError("questions and documents must have the same length")
        out: dict[str, list[float]] = {}
        if not documents:
            return {s: [] for s in SCREENING_SIGNALS if s in wanted}
        units = {d: _units(d) for d in _dedupe(documents)}
        texts: list[str] = []
        if "relevance" in wanted:
            texts += list(questions)
            texts += [u for d in units.values() for u in d.relevance]
        if "instruction" in wanted:
            texts += [u for d in units.values() for u in d.instruction]
        index, emb = self._embed_map(texts)
        if "relevance" in wanted:
            rel: list[float] = []
            for q, d in zip(questions, documents, strict=True):
                rows = emb[[index[u] for u in units[d].relevance]]
                rel.append(float((rows @ emb[index[q]]).max()))
            out["relevance"] = rel
        if "instruction" in wanted:
            bank = self._bank_embeddings()
            ins: dict[str, float] = {}
            for d, u in units.items():
                sims = emb[[index[s] for s in u.instruction]] @ bank.T
                ins[d] = max(pattern_score(d), self.ramp(float(sims.max())))
            out["instruction"] = [ins[d] for d in documents]
        return out

    def relevance_matrix(self, questions: Sequence[str], documents: Sequence[str]) -> torch.Tensor:
        """``relevance`` of every question (rows) against every document (columns), on the
        CPU: the same value :meth:`score_pairs` gives, for benchmarks that cross many
        questions with many documents."""
        units = [_units(d).relevance for d in documents]
        index, emb = self._embed_map([*questions, *(u for us in units for u in us)])
        q = emb[[index[x] for x in questions]]
        cols = [(q @ emb[[index[u] for u in us]].T).max(dim=1).values for us in units]
        return torch.stack(cols, dim=1).cpu() if cols else torch.zeros(len(questions), 0)

    def instruction_scores(self, documents: Sequence[str]) -> list[float]:
        """``instruction`` of each document (it does not depend on the question)."""
        return self.score_pairs([""] * len(documents), documents, ("instruction",))["instruction"]

    def explain(self, document: str) -> InstructionExplanation:
        """The parts of *document*'s ``instruction`` score."""
        matches = pattern_matches(document)
        sentences = _units(document).instruction
        sims = self.embed(sentences) @ self._bank_embeddings().T
        flat = int(sims.argmax())
        row, col = divmod(flat, sims.shape[1])
        similarity = float(sims.max())
        pscore = max(matches.values(), default=0.0)
        sscore = self.ramp(similarity)
        return InstructionExplanation(
            score=max(pscore, sscore),
            pattern_score=pscore,
            patterns=matches,
            similarity=similarity,
            similarity_score=sscore,
            sentence=sentences[row],
            exemplar=self.exemplars[col],
        )

    def __repr__(self) -> str:
        return (
            f"DocumentScreener(embedder={type(self.embedder).__name__}, device={self.device}, "
            f"exemplars={len(self.exemplars)}, sim_low={self.sim_low}, sim_high={self.sim_high})"
        )


def signals_of(scores: Mapping[str, Sequence[float]], i: int) -> dict[str, float]:
    """Row *i* of :meth:`DocumentScreener.score_pairs`'s output."""
    return {k: float(v[i]) for k, v in scores.items()}
