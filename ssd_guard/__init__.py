"""ssd-guard: fast uncertainty guardrails for LLM calls, by Semantic Self-Distillation."""

from ssd_guard._version import __version__
from ssd_guard.mixture import GaussianMixture

__all__ = ["GaussianMixture", "__version__"]
