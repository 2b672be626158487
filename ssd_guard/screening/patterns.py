"""The injection pattern table: weighted regular expressions for text that reads as an
instruction to the model (:data:`INJECTION_PATTERNS`)."""

from __future__ import annotations

import re
from dataclasses import dataclass


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
