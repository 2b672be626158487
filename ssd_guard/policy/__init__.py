"""Declarative YAML policies: the schema, loading with precise errors, and rule evaluation.

Modules, in the order the data flows:

:mod:`~ssd_guard.policy.parsing`
    bytes -> plain data, bounded (file size, node count, depth, alias expansion), and
    ``FILE: KEY.PATH: reason`` error reporting;
:mod:`~ssd_guard.policy.schema`
    the pydantic models (:class:`Policy`, :class:`Rule`...) and :meth:`Policy.decide`,
    which returns a :class:`Decision`;
:mod:`~ssd_guard.policy.loading`
    :func:`load_policy`, the shipped default, and :func:`check_policy_references`;
:mod:`~ssd_guard.policy.describe`
    :func:`describe_policy`, the policy in plain words.

Every public name is importable from ``ssd_guard.policy``.
"""

from __future__ import annotations

from ssd_guard.policy.describe import describe_policy
from ssd_guard.policy.loading import (
    check_policy_file,
    check_policy_references,
    default_policy_path,
    load_default_policy,
    load_policy,
)
from ssd_guard.policy.parsing import MAX_POLICY_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES
from ssd_guard.policy.schema import (
    BLOCKING_ACTIONS,
    MAX_TTL_S,
    METRICS,
    SCOPE_ACTIONS,
    SCOPE_METRICS,
    ActionName,
    CacheConfig,
    Condition,
    Decision,
    Policy,
    Rule,
    Scope,
    Source,
    Threshold,
)

__all__ = [
    "BLOCKING_ACTIONS",
    "MAX_POLICY_BYTES",
    "MAX_TTL_S",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "METRICS",
    "SCOPE_ACTIONS",
    "SCOPE_METRICS",
    "ActionName",
    "CacheConfig",
    "Condition",
    "Decision",
    "Policy",
    "Rule",
    "Scope",
    "Source",
    "Threshold",
    "check_policy_file",
    "check_policy_references",
    "default_policy_path",
    "describe_policy",
    "load_default_policy",
    "load_policy",
]
