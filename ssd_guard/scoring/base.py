"""The interface every risk scorer implements, and what the guard needs of one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["AnswerScorer", "PairScorer", "PromptScorer", "RiskScorer"]


@runtime_checkable
class PromptScorer(Protocol):
    """Prompts in, one risk score per prompt out (higher = riskier)."""

    name: str

    def score_prompts(self, prompts: Sequence[str]) -> list[float]: ...


@runtime_checkable
class AnswerScorer(Protocol):
    """Log-likelihood of candidate answers given their prompts (higher = more plausible).

    ``answers`` holds one string per prompt (returns ``list[float]``) or a list of
    candidates per prompt (returns ``list[list[float]]``).
    """

    def score_answers(
        self, prompts: Sequence[str], answers: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[float] | list[list[float]]: ...


@runtime_checkable
class RiskScorer(PromptScorer, AnswerScorer, Protocol):
    """What the guard needs: both signals plus the identity recorded in audit events.

    ``fingerprint`` identifies the student (sha256 prefix of its weights), ``model_id``
    the base model whose hidden states it reads, ``layer`` the layer it reads.
    ``calibration`` maps ``"entropy"`` / ``"loglik"`` to sorted validation-set values,
    so thresholds can be given as quantiles.
    """

    fingerprint: str
    model_id: str
    layer: int
    calibration: dict[str, list[float]]


@runtime_checkable
class PairScorer(Protocol):
    """Post-generation scorers that read the base model's pass over prompt + answer
    (SemGrad, HybridGrad, draft-model epistemic uncertainty): one risk per
    ``(prompt, answer)`` pair, higher = riskier.

    ``prompts`` are the exact texts the base model sees when ``formatted`` is true (the
    evaluation harness passes them so); otherwise the scorer formats them as its
    ``format_prompt`` callable says (the guard passes raw user prompts). ``signal`` is
    the policy key (``semgrad``, ``hybridgrad``, ``draft_eu``); ``calibration`` maps it
    to sorted validation-set values so quantile thresholds work; ``fingerprint`` is the
    base model's weight fingerprint the scorer was built for.
    """

    name: str
    signal: str
    calibration: dict[str, list[float]]

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> list[float]: ...
