"""The policy schema (pydantic models) and rule evaluation (:meth:`Policy.decide`).

A policy is a list of rules evaluated in order for one *scope* of an LLM call:

``prompt``
    before generation, on the prompt (only ``entropy`` exists yet);
``answer``
    after generation, on the answer (``loglik`` of the answer, plus the prompt's ``entropy``);
``document``
    on a retrieved document, a tool output or a cache hit (``loglik`` of the text under the
    prompt's predicted answer distribution, plus the prompt's ``entropy``; the screening
    signals ``relevance`` and ``instruction`` of :mod:`ssd_guard.screening`).

The first rule whose scope, filters and condition all match decides the action; when none
matches, ``default_action`` applies. Every key is checked (unknown keys are errors).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from ssd_guard.errors import PolicyError
from ssd_guard.policy.parsing import (
    ROOT,
    PathError,
    convert_validation_error,
    format_path,
    parse_policy_yaml,
    policy_error,
    policy_errors,
    top_level_reason,
)

__all__ = [
    "ANSWER_SIGNALS",
    "BLOCKING_ACTIONS",
    "DOCUMENT_SIGNALS",
    "HIGHER_IS_RISKIER",
    "MAX_TTL_S",
    "METRICS",
    "PAIR_SIGNALS",
    "SCOPE_ACTIONS",
    "SCOPE_METRICS",
    "UNCALIBRATED_SIGNALS",
    "ActionName",
    "CacheConfig",
    "CalibratedBound",
    "Condition",
    "Decision",
    "Policy",
    "Rule",
    "Scope",
    "Source",
    "Threshold",
]

Scope = Literal["prompt", "answer", "document"]
ActionName = Literal["allow", "abstain", "retrieve", "reject_answer", "flag_poisoned", "log_only"]
Source = Literal["retrieval", "tool", "cache"]
Metric = Literal[
    "entropy",
    "risk",
    "loglik",
    "pmi",
    "consensus",
    "semgrad",
    "hybridgrad",
    "draft_eu",
    "relevance",
    "instruction",
]

#: The scores a condition can test. ``entropy``: pre-generation risk of the prompt (higher is
#: riskier). The answer signals (lower is more suspicious for each): ``loglik``:
#: log-likelihood of an answer / document under the prompt's predicted answer distribution;
#: ``pmi``: that minus its log-density under the student's *unconditional* answer
#: distribution (pointwise mutual information: an answer that is likely for *any* question
#: no longer passes); ``consensus``: minus the distance of the answer to the predicted
#: mixture mean (the semantic consensus of the answers the model would give).
#: ``risk`` (higher is riskier): the student's combined probability that the default
#: answer is wrong (:mod:`ssd_guard.scoring.risk`; its pre-generation variant on scope
#: ``prompt``, with the answer's signals on scope ``answer``). ``semgrad``, ``hybridgrad``
#: (gradient uncertainty, :mod:`ssd_guard.scoring.semgrad`) and ``draft_eu`` (draft-model
#: epistemic uncertainty, :mod:`ssd_guard.scoring.draft_eu`): post-generation scorers the
#: guard runs beside the student (``Guard(pair_scorers=...)``), higher is riskier.
#: Document screening (:mod:`ssd_guard.screening`, scope ``document`` only): ``relevance``
#: (cosine similarity of the question and the document, lower is more suspicious: the
#: document belongs to another question or to none) and ``instruction`` (in ``[0, 1]``,
#: higher is riskier: the text reads as an instruction to the model, a prompt injection).
METRICS: tuple[str, ...] = (
    "entropy",
    "risk",
    "loglik",
    "pmi",
    "consensus",
    "semgrad",
    "hybridgrad",
    "draft_eu",
    "relevance",
    "instruction",
)

#: The answer-side signals one scorer pass gives.
ANSWER_SIGNALS: tuple[str, ...] = ("loglik", "pmi", "consensus")

#: Answer-scope signals of the post-generation scorers that run beside the student.
PAIR_SIGNALS: tuple[str, ...] = ("semgrad", "hybridgrad", "draft_eu")

#: Document-scope screening signals (:class:`ssd_guard.screening.DocumentScreener`).
DOCUMENT_SIGNALS: tuple[str, ...] = ("relevance", "instruction")

#: Signals the student's calibration set holds no values of: only raw bounds (``gt``,
#: ``lt``...) apply to them, quantile and ``calibrated`` bounds are refused at load.
UNCALIBRATED_SIGNALS: frozenset[str] = frozenset(DOCUMENT_SIGNALS)

#: Signals for which a higher value is riskier (the others: lower is more suspicious).
HIGHER_IS_RISKIER: frozenset[str] = frozenset({"entropy", "risk", *PAIR_SIGNALS, "instruction"})

#: Which scores exist at each scope.
SCOPE_METRICS: Mapping[str, frozenset[str]] = {
    "prompt": frozenset({"entropy", "risk"}),
    "answer": frozenset({"entropy", "risk", *ANSWER_SIGNALS, *PAIR_SIGNALS}),
    "document": frozenset({"entropy", *ANSWER_SIGNALS, *DOCUMENT_SIGNALS}),
}

#: Which actions make sense at each scope.
SCOPE_ACTIONS: Mapping[str, frozenset[str]] = {
    "prompt": frozenset({"allow", "abstain", "retrieve", "log_only"}),
    "answer": frozenset({"allow", "abstain", "reject_answer", "log_only"}),
    "document": frozenset({"allow", "abstain", "flag_poisoned", "log_only"}),
}

#: Actions that stop the call from going through as is.
BLOCKING_ACTIONS: frozenset[str] = frozenset({"abstain", "reject_answer"})

#: Actions allowed as ``default_action`` (it applies to every scope).
DEFAULT_ACTIONS: frozenset[str] = frozenset({"allow", "log_only", "abstain"})

#: The parameter each action takes, with its default.
ACTION_PARAMS: Mapping[str, Mapping[str, Any]] = {
    "reject_answer": {"max_regenerations": 1},
    "flag_poisoned": {"mode": "drop"},
    "retrieve": {"k": 4},
}

SUPPORTED_VERSIONS = (1,)

#: Longest cache ``ttl_s`` accepted: ten years, in seconds. Redis refuses an expiry whose
#: milliseconds overflow a 64-bit integer, so a bound is needed, and no score should outlive
#: the student that produced it by more than that.
MAX_TTL_S = 10 * 365 * 24 * 3600

_BOUNDS = ("gt", "ge", "lt", "le")


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------
def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return float(value)


def _quantile_range(value: float) -> float:
    if not (0.0 <= value <= 1.0):  # also catches NaN
        raise ValueError(f"expected a quantile between 0 and 1, got {value}")
    return float(value)


def _slug(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("expected a non-empty name")
    if stripped != value or any(c.isspace() for c in value):
        raise ValueError(f"names may not contain whitespace, got {value!r}")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def _cache_url(value: str) -> str:
    if value == "memory":
        return value
    reason = (
        "expected 'memory' or a redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] "
        f"or unix:///PATH URL, got {value!r}"
    )
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError when out of range / not a number
    except ValueError as exc:
        raise ValueError(f"{reason} ({exc})") from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ValueError(f"{reason} (no host)")
        if port == 0:
            raise ValueError(f"{reason} (port 0)")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(f"{reason} (database {db!r} is not a number)")
        return value
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{reason} (no socket path)")
        return value
    raise ValueError(reason)


FiniteFloat = Annotated[float, AfterValidator(_finite)]
QuantileFloat = Annotated[float, AfterValidator(_quantile_range)]
Name = Annotated[str, AfterValidator(_slug)]
NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, validate_by_name=True, validate_by_alias=True
    )


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------
class CacheConfig(_Model):
    """Where scores are cached, keyed by student fingerprint, model, layer and text."""

    url: Annotated[str, AfterValidator(_cache_url)] = "memory"
    """``memory`` (in-process LRU) or ``redis://``, ``rediss://``, ``unix://`` URL."""
    ttl_s: int = Field(default=86_400, gt=0, le=MAX_TTL_S)
    """Time-to-live of an entry, seconds (at most :data:`MAX_TTL_S`, ten years)."""
    fail_mode: Literal["open", "closed"] = "open"
    """Redis down: ``open`` = a miss, go on; ``closed`` = raise CacheUnavailableError."""
    namespace: Name = "ssd-guard"
    """Prefix of every key (``namespace:sha256``)."""
    timeout_s: float = Field(default=0.05, gt=0, le=60)
    """Socket connect / read timeout of one Redis command."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts of one Redis command on a connection error / timeout."""
    cooldown_s: float = Field(default=1.0, ge=0, le=3600)
    """After Redis is found down, skip it this long before probing again (circuit breaker)."""
    max_entries: int = Field(default=10_000, gt=0)
    """Capacity of the memory cache (least recently used entries go first)."""
    command_deadline_s: float | None = Field(default=None, gt=0, le=60)
    """Bound on one whole Redis operation, retries included (a Redis trickling bytes counts
    as a timeout); default ``4 * timeout_s + 0.05``."""
    max_entry_bytes: int = Field(default=262_144, ge=1)
    """Most bytes one entry read may transfer (reads use ``GETRANGE``); a larger value
    under a score key is a logged miss."""
    allow_unsigned: bool = False
    """Run a Redis cache without ``SSD_GUARD_CACHE_HMAC_KEY``: it warns when open and is
    refused under ``fail_mode: closed`` unless this is true."""


class CalibratedBound(_Model):
    """``calibrated: {max_error: 0.2, confidence: 0.9}``: the bound chosen by
    ``ssd-guard calibrate`` (the calibration file beside the student) such that among the
    prompts this condition does NOT match, at most ``max_error`` of the default answers are
    wrong with probability at least ``confidence``. The condition matches the rest (the
    prompts to stop): pair it with ``abstain`` / ``retrieve``. Resolved by
    :func:`~ssd_guard.policy.load_policy`."""

    max_error: float = Field(gt=0, lt=1)
    confidence: float = Field(gt=0, lt=1)
    abstain_max_right: float | None = Field(default=None, gt=0, lt=1)
    """Match the calibrated *abstain* region instead (``ssd-guard calibrate
    --abstain-beta``): the prompts where at most this share of the default answers would
    have been right. Put such a rule (``abstain``) before the plain one (``retrieve``) to
    route answer / escalate / abstain."""


class Threshold(_Model):
    """Bounds on one score: raw values (``gt``, ``ge``, ``lt``, ``le``) or quantiles of the
    calibration set stored with the student (``gt_quantile``...). At most one lower and one
    upper bound; both together mean a band. ``calibrated`` (alone) takes the bound from the
    student's calibration file (:class:`CalibratedBound`)."""

    gt: FiniteFloat | None = None
    ge: FiniteFloat | None = None
    lt: FiniteFloat | None = None
    le: FiniteFloat | None = None
    gt_quantile: QuantileFloat | None = None
    ge_quantile: QuantileFloat | None = None
    lt_quantile: QuantileFloat | None = None
    le_quantile: QuantileFloat | None = None
    calibrated: CalibratedBound | None = None

    #: ``(op, value, guarantee text)`` once a ``calibrated`` bound is resolved
    _resolved: tuple[str, float, str] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if self.calibrated is not None:
            if self.bounds():
                raise ValueError("'calibrated' cannot be combined with other bounds")
            return self
        bounds = self.bounds()
        if not bounds:
            raise ValueError(
                "expected at least one bound: gt, ge, lt, le, gt_quantile, ge_quantile, "
                "lt_quantile or le_quantile"
            )
        lower = [(op, q, v) for op, q, v in bounds if op in ("gt", "ge")]
        upper = [(op, q, v) for op, q, v in bounds if op in ("lt", "le")]
        for side, found in (("lower", lower), ("upper", upper)):
            if len(found) > 1:
                keys = ", ".join(_key(op, q) for op, q, _ in found)
                raise ValueError(
                    f"more than one {side} bound ({keys}); give one, or combine conditions "
                    "with 'all'"
                )
        if lower and upper and lower[0][1] == upper[0][1]:
            (lop, q, lv), (uop, _, uv) = lower[0], upper[0]
            empty = lv > uv or (lv == uv and (lop == "gt" or uop == "lt"))
            if empty:
                raise ValueError(
                    f"empty range: {_key(lop, q)} {lv} and {_key(uop, q)} {uv} can never both hold"
                )
        return self

    def bounds(self) -> list[tuple[str, bool, float]]:
        """``(op, is_quantile, value)`` for every bound that is set (a resolved
        ``calibrated`` bound counts as a raw one; an unresolved one as none)."""
        out: list[tuple[str, bool, float]] = []
        if self._resolved is not None:
            return [(self._resolved[0], False, self._resolved[1])]
        for op in _BOUNDS:
            raw = getattr(self, op)
            if raw is not None:
                out.append((op, False, raw))
            q = getattr(self, f"{op}_quantile")
            if q is not None:
                out.append((op, True, q))
        return out

    @property
    def uses_quantiles(self) -> bool:
        return any(q for _, q, _ in self.bounds())

    @property
    def unresolved_calibration(self) -> bool:
        """A ``calibrated`` bound not (yet) resolved against a calibration file."""
        return self.calibrated is not None and self._resolved is None

    @property
    def guarantee(self) -> str | None:
        """The resolved ``calibrated`` bound's guarantee in plain words."""
        return None if self._resolved is None else self._resolved[2]

    def resolve_calibrated(self, op: str, value: float, guarantee: str) -> None:
        """Set the raw bound a ``calibrated`` one stands for (done by ``load_policy``)."""
        if self.calibrated is None:
            raise ValueError("not a calibrated bound")
        self._resolved = (op, float(value), guarantee)


def _uncalibrated_problems(
    path: tuple[str | int, ...], metric: str, threshold: Threshold
) -> list[tuple[tuple[str | int, ...], str]]:
    """Quantile / ``calibrated`` bounds on a signal the calibration set does not hold."""
    raw = "gt or ge" if metric in HIGHER_IS_RISKIER else "lt or le"
    reason = (
        f"the student's calibration set holds no {metric} values (document screening is not "
        f"calibrated), so {metric} takes raw bounds only: use {raw} with a value (see "
        "benchmarks/results/screening-minilm.json for measured thresholds)"
    )
    if threshold.calibrated is not None:
        return [((*path, "calibrated"), f"a calibrated bound is not available: {reason}")]
    return [
        ((*path, f"{op}_quantile"), f"quantile bounds are not available: {reason}")
        for op, is_q, _ in threshold.bounds()
        if is_q
    ]


def _key(op: str, quantile: bool) -> str:
    return f"{op}_quantile" if quantile else op


class Condition(_Model):
    """A test on the scores. ``entropy`` / ``loglik`` bounds and ``all`` / ``any`` lists of
    sub-conditions; everything given in one mapping must hold together (AND).

    A comparison on a score that is missing or NaN is false, so a rule that needs that
    score does not match (under ``any`` another branch may still match); the decision lists
    the missing score in ``missing_scores``.
    """

    entropy: Threshold | None = None
    risk: Threshold | None = None
    loglik: Threshold | None = None
    pmi: Threshold | None = None
    consensus: Threshold | None = None
    semgrad: Threshold | None = None
    hybridgrad: Threshold | None = None
    draft_eu: Threshold | None = None
    relevance: Threshold | None = None
    instruction: Threshold | None = None
    all_: list[Condition] | None = Field(default=None, alias="all", min_length=1)
    any_: list[Condition] | None = Field(default=None, alias="any", min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Condition:
        if all(getattr(self, m) is None for m in METRICS) and not self.all_ and not self.any_:
            raise ValueError(f"expected at least one of {', '.join(METRICS)}, all, any")
        return self

    def leaves(
        self, prefix: tuple[str | int, ...] = ()
    ) -> Iterator[tuple[tuple[str | int, ...], str, Threshold]]:
        """``(key path, metric, threshold)`` of every bound, depth first."""
        for metric in METRICS:
            threshold = getattr(self, metric)
            if threshold is not None:
                yield (*prefix, metric), metric, threshold
        for alias, subs in (("all", self.all_), ("any", self.any_)):
            for i, sub in enumerate(subs or ()):
                yield from sub.leaves((*prefix, alias, i))

    def metrics(self) -> set[str]:
        return {metric for _, metric, _ in self.leaves()}


class Rule(_Model):
    """One rule: *scope* + optional filters + condition -> action (+ its parameters).

    Filters: ``tags`` matches a call carrying ANY of the listed tags (``tags_match: all``
    requires every one); ``run_names`` holds glob patterns (``fnmatch``, case-sensitive)
    matched against the run name; ``sources`` (document scope only) restricts to documents
    coming from ``retrieval``, ``tool`` or ``cache``. A filter that is given but for which the
    call carries nothing (no tags, no run name, no source) does not match.
    """

    name: Name
    scope: Scope
    when: Condition | None = None
    """Omitted: the rule matches every call its filters let through."""
    action: ActionName
    description: str | None = None
    tags: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    tags_match: Literal["any", "all"] = "any"
    run_names: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    sources: list[Source] | None = Field(default=None, min_length=1)
    max_regenerations: int | None = Field(default=None, ge=0, le=10)
    """reject_answer: how many times to regenerate before abstaining (default 1)."""
    mode: Literal["drop", "quarantine"] | None = None
    """flag_poisoned: drop the document, or keep it aside in quarantine (default drop)."""
    k: int | None = Field(default=None, ge=1, le=100)
    """retrieve: how many documents to fetch (default 4)."""
    message: str | None = None
    """abstain / reject_answer: the message shown instead of an answer."""

    @model_validator(mode="after")
    def _check(self) -> Rule:
        problems: list[tuple[tuple[str | int, ...], str]] = []  # all of them, in order
        allowed_metrics = SCOPE_METRICS[self.scope]
        if self.when is not None:
            for path, metric, _ in self.when.leaves(("when",)):
                if metric not in allowed_metrics:
                    problems.append(
                        (
                            path,
                            f"{metric} is not available on scope '{self.scope}' ("
                            + (
                                "it screens a document against the question"
                                if metric in DOCUMENT_SIGNALS
                                else "before generation there is no answer to score"
                                if self.scope == "prompt"
                                else "it scores the model's own answer, not a document"
                            )
                            + "); scopes that have it: "
                            + ", ".join(s for s, m in SCOPE_METRICS.items() if metric in m),
                        )
                    )
            for path, metric, threshold in self.when.leaves(("when",)):
                if metric in UNCALIBRATED_SIGNALS:
                    problems.extend(_uncalibrated_problems(path, metric, threshold))
        if self.action not in SCOPE_ACTIONS[self.scope]:
            ok = sorted(s for s, acts in SCOPE_ACTIONS.items() if self.action in acts)
            problems.append(
                (
                    ("action",),
                    f"action '{self.action}' does not apply to scope '{self.scope}' "
                    f"(it needs scope {' or '.join(repr(s) for s in ok)})",
                )
            )
        for param, owners in (
            ("max_regenerations", {"reject_answer"}),
            ("mode", {"flag_poisoned"}),
            ("k", {"retrieve"}),
            ("message", {"abstain", "reject_answer"}),
        ):
            if getattr(self, param) is not None and self.action not in owners:
                problems.append(
                    (
                        (param,),
                        f"only applies to action {' / '.join(sorted(owners))} "
                        f"(this rule's action is '{self.action}')",
                    )
                )
        if self.sources is not None and self.scope != "document":
            problems.append((("sources",), "only applies to scope 'document'"))
        if problems:
            raise PathError.of(problems)
        return self

    @property
    def needs_calibration(self) -> set[str]:
        """Metrics whose calibration values this rule's quantile bounds need."""
        if self.when is None:
            return set()
        return {metric for _, metric, t in self.when.leaves() if t.uses_quantiles}

    def params(self) -> dict[str, Any]:
        """The action's parameters with defaults filled in."""
        out = dict(ACTION_PARAMS.get(self.action, {}))
        for key in out:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def filters_match(self, tags: Sequence[str], run_name: str | None, source: str | None) -> bool:
        if self.tags is not None:
            have = set(tags)
            if self.tags_match == "all":
                if not all(t in have for t in self.tags):
                    return False
            elif not any(t in have for t in self.tags):
                return False
        if self.run_names is not None and (
            run_name is None or not any(fnmatchcase(run_name, pat) for pat in self.run_names)
        ):
            return False
        return self.sources is None or (source is not None and source in self.sources)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one call at one scope."""

    action: ActionName
    rule: str | None
    """The matching rule's name; ``None`` when ``default_action`` applied."""
    scope: Scope
    scores: dict[str, float]
    """The scores the decision was made on (missing / NaN ones are left out)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Resolved raw bounds of the matching rule, e.g. ``{"entropy.gt": 2.31}``; bounds inside
    ``all`` / ``any`` are prefixed with their path (``any[1].loglik.lt``)."""
    params: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    missing_scores: tuple[str, ...] = ()
    """Scores some evaluated rule needed but that were missing or NaN."""
    policy_name: str | None = None

    @property
    def blocking(self) -> bool:
        """True for abstain / reject_answer: the call's output must not go through as is."""
        return self.action in BLOCKING_ACTIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rule": self.rule,
            "scope": self.scope,
            "scores": dict(self.scores),
            "thresholds": dict(self.thresholds),
            "params": dict(self.params),
            "message": self.message,
            "missing_scores": list(self.missing_scores),
            "policy_name": self.policy_name,
            "blocking": self.blocking,
        }


def _duplicate_names(names: Sequence[Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """``(("rules", i, "name"), reason)`` for each rule whose name an earlier rule has."""
    seen: dict[str, int] = {}
    out: list[tuple[tuple[str | int, ...], str]] = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in seen:
            out.append(
                (
                    ("rules", i, "name"),
                    f"duplicate rule name '{name}' (already used by rules[{seen[name]}])",
                )
            )
        else:
            seen[name] = i
    return out


class Policy(_Model):
    """A whole policy file. Build it with :func:`load_policy`, :meth:`from_yaml_text` or in
    code (``Policy(name=..., rules=[Rule(...)])``)."""

    version: int = 1
    name: Name
    description: str = ""
    student: NonEmptyStr = "bundled"
    """Student artifact directory, or ``bundled`` for the one that ships with ssd-guard."""
    proxy_model: NonEmptyStr | None = None
    """Local HF model read for hidden states when the agent's model is API-only."""
    cache: CacheConfig = CacheConfig()
    abstain_message: NonEmptyStr = "I'm not confident I can answer that reliably."
    default_action: ActionName = "allow"
    rules: list[Rule]

    _sha256: str | None = PrivateAttr(default=None)
    _source: str = PrivateAttr(default="<code>")

    SUPPORTED_VERSIONS: ClassVar[tuple[int, ...]] = SUPPORTED_VERSIONS

    @model_validator(mode="after")
    def _check(self) -> Policy:
        problems: list[tuple[Sequence[str | int], str]] = []  # all of them, in order
        if self.version not in SUPPORTED_VERSIONS:
            problems.append(
                (
                    ("version",),
                    f"unsupported policy version {self.version} (this ssd-guard reads "
                    f"{', '.join(map(str, SUPPORTED_VERSIONS))})",
                )
            )
        if self.default_action not in DEFAULT_ACTIONS:
            problems.append(
                (
                    ("default_action",),
                    f"applies to every scope; expected one of "
                    f"{', '.join(sorted(DEFAULT_ACTIONS))}, got '{self.default_action}'",
                )
            )
        problems.extend(_duplicate_names([rule.name for rule in self.rules]))
        if problems:
            raise PathError.of(problems)
        return self

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_yaml_text(cls, text: str | bytes, source: str = "<string>") -> Policy:
        """Parse and validate a policy from YAML text; errors name *source*."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        lines: dict[str, int] = {}
        return cls._from_parsed(
            data, parse_policy_yaml(data, source, key_lines=lines), source, lines
        )

    @classmethod
    def _from_parsed(
        cls, data: bytes, parsed: Any, source: str, key_lines: Mapping[str, int]
    ) -> Policy:
        """Validate what :func:`parse_policy_yaml` made of *data* (parsed once only)."""
        policy = cls.from_mapping(parsed, source, key_lines=key_lines)
        policy._sha256 = hashlib.sha256(data).hexdigest()
        return policy

    @classmethod
    def from_mapping(
        cls, data: Any, source: str = "<mapping>", *, key_lines: Mapping[str, int] | None = None
    ) -> Policy:
        """Validate an already-parsed mapping; errors name *source* like :func:`load_policy`
        (and the line of an unknown top-level key, given *key_lines*: key -> line)."""
        if not isinstance(data, Mapping):
            raise policy_error(source, ROOT, top_level_reason(data))
        try:
            policy = cls.model_validate(dict(data))
        except ValidationError as exc:
            error = convert_validation_error(exc, source, cls, key_lines)
            # A rule that fails its own checks keeps the policy's checks from running:
            # report the duplicate rule names of the raw rules too (every error at once).
            rules = data.get("rules")
            names = (
                [r.get("name") if isinstance(r, Mapping) else None for r in rules]
                if isinstance(rules, list)
                else []
            )
            problems = list(error.problems)  # type: ignore[attr-defined]
            for sub, reason in _duplicate_names(names):
                if (format_path(sub), reason) not in problems:
                    problems.append((format_path(sub), reason))
            raise policy_errors(source, problems) from None
        policy._source = source
        return policy

    # -- identity ----------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """sha256 of the policy file's bytes, or of canonical JSON when built in code."""
        if self._sha256 is None:
            canonical = json.dumps(
                self.model_dump(mode="json", by_alias=True),
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            )
            self._sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._sha256

    @property
    def source(self) -> str:
        """The file the policy was read from (``<string>`` / ``<code>`` otherwise)."""
        return self._source

    @property
    def requires_calibration(self) -> set[str]:
        """Metrics for which some rule uses a quantile bound."""
        out: set[str] = set()
        for rule in self.rules:
            out |= rule.needs_calibration
        return out

    def check_calibration(
        self, calibration: Mapping[str, Sequence[float]] | None, scope: str | None = None
    ) -> None:
        """Raise :class:`PolicyError` if a quantile rule (of *scope*, or any) lacks values,
        or a ``calibrated`` bound was not resolved against a calibration file."""
        for rule in self.rules:
            if scope is not None and rule.scope != scope:
                continue
            for _path, metric, threshold in rule.when.leaves() if rule.when else ():
                if threshold.unresolved_calibration:
                    raise PolicyError(
                        f"{self._source}: rule '{rule.name}' uses a calibrated {metric} bound "
                        "that was not resolved against the student's calibration file (load "
                        "the policy with load_policy, after `ssd-guard calibrate`)"
                    )
            for metric in sorted(rule.needs_calibration):
                values = None if calibration is None else calibration.get(metric)
                if values is None or len(_sorted_finite(values)) == 0:
                    have = (
                        "no calibration was given"
                        if calibration is None
                        else (f"the calibration has no {metric!r} values")
                    )
                    raise PolicyError(
                        f"{self._source}: rule '{rule.name}' uses a {metric} quantile threshold "
                        f"and needs calibration values for {metric!r}, but {have} (pass the "
                        "student's calibration, or use raw thresholds such as gt / lt)"
                    )

    # -- evaluation --------------------------------------------------------------------
    def decide(
        self,
        scope: Scope,
        scores: Mapping[str, float | None],
        *,
        calibration: Mapping[str, Sequence[float]] | None = None,
        tags: Sequence[str] = (),
        run_name: str | None = None,
        source: str | None = None,
        skip_actions: Collection[str] = (),
    ) -> Decision:
        """Evaluate the rules of *scope* in order; the first match decides.

        Rules whose action is in *skip_actions* are left out (the guard decides again
        after retrieval without the ``retrieve`` rules).

        *scores* maps metric names to values (``None`` / NaN = missing). Quantile bounds are
        resolved against *calibration* (values per metric, treated as immutable); a rule of
        this scope that needs calibration which is not there raises :class:`PolicyError`.
        """
        if scope not in SCOPE_METRICS:
            raise ValueError(f"unknown scope {scope!r}; expected prompt, answer or document")
        self.check_calibration(calibration, scope)
        values: dict[str, float] = {}
        for metric, value in scores.items():
            if value is None:
                continue
            number = float(value)
            if not math.isnan(number):
                values[metric] = number
        missing: set[str] = set()
        tags = tuple(tags)
        for rule in self.rules:
            if rule.scope != scope or not rule.filters_match(tags, run_name, source):
                continue
            if rule.action in skip_actions:
                continue
            thresholds: dict[str, float] = {}
            matched = True
            if rule.when is not None:
                matched = _evaluate(rule.when, (), values, calibration, thresholds, missing)
            if matched:
                message = None
                if rule.action in BLOCKING_ACTIONS:
                    message = rule.message or self.abstain_message
                return Decision(
                    action=rule.action,
                    rule=rule.name,
                    scope=scope,
                    scores=values,
                    thresholds=thresholds,
                    params=rule.params(),
                    message=message,
                    missing_scores=tuple(sorted(missing)),
                    policy_name=self.name,
                )
        return Decision(
            action=self.default_action,
            rule=None,
            scope=scope,
            scores=values,
            thresholds={},
            params={},
            message=self.abstain_message if self.default_action in BLOCKING_ACTIONS else None,
            missing_scores=tuple(sorted(missing)),
            policy_name=self.name,
        )

    def resolve_thresholds(
        self, rule: Rule | str, calibration: Mapping[str, Sequence[float]] | None = None
    ) -> dict[str, float | None]:
        """The raw bounds of *rule* (quantiles resolved when *calibration* has the metric,
        ``None`` where it does not)."""
        if isinstance(rule, str):
            by_name = {r.name: r for r in self.rules}
            if rule not in by_name:
                raise KeyError(rule)
            rule = by_name[rule]
        out: dict[str, float | None] = {}
        if rule.when is None:
            return out
        for path, metric, threshold in rule.when.leaves():
            prefix = format_path(path[:-1])
            prefix = f"{prefix}." if prefix else ""
            for op, is_q, v in threshold.bounds():
                key = f"{prefix}{metric}.{op}"
                if not is_q:
                    out[key] = v
                else:
                    vals = None if calibration is None else calibration.get(metric)
                    out[key] = _quantile(_sorted_finite(vals), v) if vals else None
        return out


# --------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------
_SORTED_CACHE: dict[int, tuple[Sequence[float], int, tuple[float, ...]]] = {}
_SORTED_CACHE_MAX = 32
_SORTED_LOCK = threading.Lock()


def _sorted_finite(values: Sequence[float] | None) -> tuple[float, ...]:
    """Finite values sorted ascending; memoised per sequence object (kept alive while cached)."""
    if values is None:
        return ()
    hit = _SORTED_CACHE.get(id(values))
    if hit is not None and hit[0] is values and hit[1] == len(values):
        return hit[2]
    result = tuple(sorted(float(v) for v in values if v is not None and math.isfinite(float(v))))
    with _SORTED_LOCK:
        while len(_SORTED_CACHE) >= _SORTED_CACHE_MAX:
            _SORTED_CACHE.pop(next(iter(_SORTED_CACHE)))
        _SORTED_CACHE[id(values)] = (values, len(values), result)
    return result


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of ascending values."""
    n = len(sorted_values)
    if n == 1:
        return float(sorted_values[0])
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _compare(value: float, op: str, bound: float) -> bool:
    if op == "gt":
        return value > bound
    if op == "ge":
        return value >= bound
    if op == "lt":
        return value < bound
    return value <= bound


def _evaluate(
    cond: Condition,
    path: tuple[str | int, ...],
    values: Mapping[str, float],
    calibration: Mapping[str, Sequence[float]] | None,
    thresholds: dict[str, float],
    missing: set[str],
) -> bool:
    """Evaluate without short-circuit so thresholds and missing scores are complete."""
    ok = True
    prefix = format_path(path)
    prefix = f"{prefix}." if prefix else ""
    for metric in METRICS:
        threshold: Threshold | None = getattr(cond, metric)
        if threshold is None:
            continue
        value = values.get(metric)
        if value is None:
            missing.add(metric)
        for op, is_q, v in threshold.bounds():
            if is_q:
                assert calibration is not None  # checked by Policy.check_calibration
                bound = _quantile(_sorted_finite(calibration[metric]), v)
            else:
                bound = v
            thresholds[f"{prefix}{metric}.{op}"] = bound
            if value is None or not _compare(value, op, bound):
                ok = False
    if cond.all_:
        results = [
            _evaluate(sub, (*path, "all", i), values, calibration, thresholds, missing)
            for i, sub in enumerate(cond.all_)
        ]
        ok = ok and all(results)
    if cond.any_:
        results = [
            _evaluate(sub, (*path, "any", i), values, calibration, thresholds, missing)
            for i, sub in enumerate(cond.any_)
        ]
        ok = ok and any(results)
    return ok
