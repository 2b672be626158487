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

The vocabulary lives in :mod:`~ssd_guard.policy.vocabulary`, the rules in
:mod:`~ssd_guard.policy.rules`, the ``cache:`` section in
:mod:`~ssd_guard.policy.cache_config` and evaluation helpers in
:mod:`~ssd_guard.policy.evaluation`; every public name is importable from here.

The first rule whose scope, filters and condition all match decides the action; when none
matches, ``default_action`` applies. Every key is checked (unknown keys are errors).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from pydantic import PrivateAttr, ValidationError, model_validator

from ssd_guard.errors import PolicyError
from ssd_guard.policy.cache_config import CacheConfig
from ssd_guard.policy.evaluation import Decision, _evaluate, _quantile, _sorted_finite
from ssd_guard.policy.fields import FiniteFloat as FiniteFloat
from ssd_guard.policy.fields import Name, NonEmptyStr, _Model
from ssd_guard.policy.fields import QuantileFloat as QuantileFloat
from ssd_guard.policy.parsing import parse_policy_yaml, top_level_reason
from ssd_guard.policy.reporting import (
    ROOT,
    PathError,
    convert_validation_error,
    format_path,
    policy_error,
    policy_errors,
)
from ssd_guard.policy.rules import CalibratedBound, Condition, Rule, Threshold
from ssd_guard.policy.vocabulary import ACTION_PARAMS as ACTION_PARAMS
from ssd_guard.policy.vocabulary import (
    ANSWER_SIGNALS,
    BLOCKING_ACTIONS,
    DEFAULT_ACTIONS,
    DOCUMENT_SIGNALS,
    HIGHER_IS_RISKIER,
    MAX_TTL_S,
    METRICS,
    PAIR_SIGNALS,
    SCOPE_ACTIONS,
    SCOPE_METRICS,
    SUPPORTED_VERSIONS,
    UNCALIBRATED_SIGNALS,
    ActionName,
    Scope,
    Source,
)
from ssd_guard.policy.vocabulary import Metric as Metric

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
