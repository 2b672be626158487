"""Rules and their conditions: :class:`Rule`, :class:`Condition`, :class:`Threshold` and
:class:`CalibratedBound`, with the checks that tie signals and actions to scopes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from ssd_guard.policy.fields import FiniteFloat, Name, NonEmptyStr, QuantileFloat, _Model
from ssd_guard.policy.reporting import PathError
from ssd_guard.policy.vocabulary import (
    _BOUNDS,
    ACTION_PARAMS,
    DOCUMENT_SIGNALS,
    HIGHER_IS_RISKIER,
    METRICS,
    SCOPE_ACTIONS,
    SCOPE_METRICS,
    UNCALIBRATED_SIGNALS,
    ActionName,
    Scope,
    Source,
)


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
