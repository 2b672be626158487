"""ssd-guard: fast uncertainty guardrails for LLM calls, by Semantic Self-Distillation.

The public surface is curated here; everything else lives in private-by-convention
modules. LangChain classes load lazily so that importing ssd_guard never imports
LangChain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ssd_guard._version import __version__
from ssd_guard.artifact import Manifest, check_compatible, load_artifact, save_artifact
from ssd_guard.audit import bind_run, configure_audit
from ssd_guard.cache import MemoryCache, RedisCache, ScoreCache, cache_from_config, make_key
from ssd_guard.encoding import AnswerEmbedder, PCAProjection, PromptEncoder
from ssd_guard.errors import (
    ArtifactError,
    ArtifactIntegrityError,
    ArtifactMismatchError,
    CacheUnavailableError,
    ConfigError,
    GuardBlockedError,
    GuardInputError,
    ModelLoadError,
    PolicyError,
    SSDGuardError,
)
from ssd_guard.features import FeatureSpec
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.local import GuardedLocalModel
from ssd_guard.mixture import GaussianMixture
from ssd_guard.models import load_causal_lm, load_embedder
from ssd_guard.policy import Decision, Policy, describe_policy, load_default_policy, load_policy
from ssd_guard.scoring.batcher import BatchingScorer, MicroBatcher
from ssd_guard.scoring.callstats import CallStats
from ssd_guard.scoring.ssd import SSDScorer
from ssd_guard.student import SSDStudent

if TYPE_CHECKING:  # the real types for type checkers; at run time they load lazily
    from ssd_guard.integrations.langchain import AsyncSSDGuard, SSDGuard
    from ssd_guard.integrations.langchain.middleware import SSDGuardMiddleware

_LAZY = {"SSDGuard", "AsyncSSDGuard", "SSDGuardMiddleware"}

__all__ = [
    "AnswerEmbedder",
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactMismatchError",
    "AsyncSSDGuard",
    "BatchingScorer",
    "CacheUnavailableError",
    "CallStats",
    "ConfigError",
    "Decision",
    "FeatureSpec",
    "GaussianMixture",
    "Guard",
    "GuardBlockedError",
    "GuardInputError",
    "GuardResult",
    "GuardedLocalModel",
    "Manifest",
    "MemoryCache",
    "MicroBatcher",
    "ModelLoadError",
    "PCAProjection",
    "Policy",
    "PolicyError",
    "PromptEncoder",
    "RedisCache",
    "SSDGuard",
    "SSDGuardError",
    "SSDGuardMiddleware",
    "SSDScorer",
    "SSDStudent",
    "ScoreCache",
    "__version__",
    "bind_run",
    "cache_from_config",
    "check_compatible",
    "configure_audit",
    "describe_policy",
    "load_artifact",
    "load_causal_lm",
    "load_default_policy",
    "load_embedder",
    "load_policy",
    "make_key",
    "save_artifact",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ssd_guard.integrations import langchain

        return getattr(langchain, name)
    raise AttributeError(f"module 'ssd_guard' has no attribute {name!r}")
