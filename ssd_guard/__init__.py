"""ssd-guard: fast uncertainty guardrails for LLM calls, by Semantic Self-Distillation.

The public surface is curated here: what a user needs to guard a call, configure it and
catch its errors. The building blocks live in their subpackages (``ssd_guard.mixture``,
``ssd_guard.encoding``, ``ssd_guard.artifact``, ``ssd_guard.scoring``, ...). LangChain
classes load lazily so that importing ssd_guard never imports LangChain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ssd_guard._version import __version__
from ssd_guard.audit import configure_audit
from ssd_guard.cache import MemoryCache
from ssd_guard.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactMismatchError,
    CacheUnavailableError,
    ConfigError,
    GuardBlockedError,
    GuardInputError,
    MissingExtraError,
    ModelLoadError,
    PolicyError,
    SSDGuardError,
)
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.local import GuardedLocalModel
from ssd_guard.policy import Policy, load_default_policy, load_policy
from ssd_guard.scoring.ssd import SSDScorer

if TYPE_CHECKING:  # the real types for type checkers; at run time they load lazily
    from ssd_guard.cache.redis_cache import RedisCache
    from ssd_guard.integrations.langchain import AsyncSSDGuard, SSDGuard
    from ssd_guard.integrations.langchain.middleware import SSDGuardMiddleware

#: Names that load on first use, from the module that holds them: LangChain's classes
#: (importing ssd_guard never imports LangChain) and RedisCache (nor redis-py).
_LAZY = {
    "SSDGuard": "ssd_guard.integrations",
    "AsyncSSDGuard": "ssd_guard.integrations",
    "SSDGuardMiddleware": "ssd_guard.integrations",
    "RedisCache": "ssd_guard.cache",
}

#: Names the root exported before the surface was curated, and where they live now. They
#: still resolve (with a DeprecationWarning naming the new import) for one release.
_MOVED = {
    "AnswerEmbedder": "ssd_guard.encoding",
    "PCAProjection": "ssd_guard.encoding",
    "PromptEncoder": "ssd_guard.encoding",
    "BatchingScorer": "ssd_guard.scoring.batcher",
    "MicroBatcher": "ssd_guard.scoring.batcher",
    "CallStats": "ssd_guard.scoring.callstats",
    "Decision": "ssd_guard.policy",
    "describe_policy": "ssd_guard.policy",
    "FeatureSpec": "ssd_guard.features",
    "GaussianMixture": "ssd_guard.mixture",
    "Manifest": "ssd_guard.artifact",
    "check_compatible": "ssd_guard.artifact",
    "load_artifact": "ssd_guard.artifact",
    "save_artifact": "ssd_guard.artifact",
    "ScoreCache": "ssd_guard.cache",
    "cache_from_config": "ssd_guard.cache",
    "make_key": "ssd_guard.cache",
    "SSDStudent": "ssd_guard.student",
    "bind_run": "ssd_guard.audit",
    "load_causal_lm": "ssd_guard.models",
    "load_embedder": "ssd_guard.models",
}

__all__ = [
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactMismatchError",
    "AsyncSSDGuard",
    "CacheUnavailableError",
    "ConfigError",
    "Guard",
    "GuardBlockedError",
    "GuardInputError",
    "GuardResult",
    "GuardedLocalModel",
    "MemoryCache",
    "MissingExtraError",
    "ModelLoadError",
    "Policy",
    "PolicyError",
    "RedisCache",
    "SSDGuard",
    "SSDGuardError",
    "SSDGuardMiddleware",
    "SSDScorer",
    "__version__",
    "configure_audit",
    "load_default_policy",
    "load_policy",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MOVED:
        import warnings

        module = _MOVED[name]
        warnings.warn(
            f"ssd_guard.{name} moved: import it from {module} (from {module} import {name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'ssd_guard' has no attribute {name!r}")
