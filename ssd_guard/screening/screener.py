"""The document screener: ``relevance`` and ``instruction`` of ``(question, document)``
pairs, embedded in one batched pass (:class:`DocumentScreener`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssd_guard.embedding import encode_normalised
from ssd_guard.screening.exemplars import SIM_HIGH, SIM_LOW, _bundled_exemplars, screening_version
from ssd_guard.screening.matching import pattern_matches, pattern_score
from ssd_guard.screening.units import _dedupe, _units

#: The document-scope signals a screener computes.
SCREENING_SIGNALS: tuple[str, ...] = ("relevance", "instruction")


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


class DocumentScreener:
    """``relevance`` and ``instruction`` of ``(question, document)`` pairs (see
    :mod:`ssd_guard.screening`).

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
        emb = encode_normalised(self.embedder, texts, self.batch_size)
        return torch.nn.functional.normalize(emb, dim=-1)  # a stand-in embedder may not

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
