"""SSD behind the stats-based scorer interface, so it is evaluated like TD, SE, SEP, PCP.

:class:`SSDStatsScorer` reads the hidden state of the artifact's layer from a
:class:`~ssd_guard.training.stats.Stats` (no LM pass when the stats came from the work
directory) and the raw sentence embeddings of answers (projected by the artifact's
PCA). Its live path is the :class:`~ssd_guard.scoring.ssd.SSDScorer` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ssd_guard.training.stats import Scorer, Stats

__all__ = ["SSDStatsScorer", "features_from_stats"]


def features_from_stats(spec: Any, stats: Stats) -> torch.Tensor:
    """The student's ``[N, F]`` input features from stored per-layer states."""
    if stats.hidden is not None:
        return spec.assemble(stats.hidden, stats.pooled)  # type: ignore[no-any-return]
    if spec.pooled_layers:
        raise ValueError("these stats hold no pooled hidden states, which the student reads")
    return torch.cat([torch.from_numpy(stats.layer(ly)) for ly in spec.layers], dim=-1)


class SSDStatsScorer(Scorer):
    """Rényi-2 entropy (pre-generation) and default-answer log-likelihood (post-generation)
    of a trained SSD student.

    Args:
        ssd: an :class:`~ssd_guard.scoring.ssd.SSDScorer` (anything with ``layer``,
            ``entropy_from_hidden``, ``loglik_from_hidden``, ``embedder.pca`` and
            ``heads["answer"].dim_``).
        name: reported name.
    """

    needs = frozenset({"hidden"})
    answer_needs = frozenset({"default_embeddings"})

    def __init__(self, ssd: Any, *, name: str = "SSD") -> None:
        self.ssd = ssd
        self.name = name

    @property
    def layers(self) -> set[int] | None:
        return set(self.ssd.features.all_layers)

    def _hidden(self, stats: Stats) -> torch.Tensor:
        stats.require(self.needs, self.name)
        return features_from_stats(self.ssd.features, stats)

    def project(self, embeddings: np.ndarray) -> torch.Tensor:
        """Raw L2-normalised embeddings ``[..., E]`` -> the answer head's PCA space."""
        pca = self.ssd.embedder.pca
        dim = int(self.ssd.heads["answer"].dim_)
        if dim < pca.dim:
            pca = pca.truncate(dim)
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        z: torch.Tensor = pca.transform(x)
        return z

    @torch.no_grad()
    def score(self, stats: Stats) -> np.ndarray:
        ent = self.ssd.entropy_from_hidden(self._hidden(stats))
        return np.asarray(ent.detach().double().cpu().numpy())

    @torch.no_grad()
    def loglik(self, stats: Stats, answer_embeddings: np.ndarray) -> np.ndarray:
        """Log-likelihood of answers given by their raw embeddings ``[N, E]`` or ``[N, C, E]``."""
        ll = self.ssd.loglik_from_hidden(self._hidden(stats), self.project(answer_embeddings))
        return np.asarray(ll.detach().double().cpu().numpy())

    @torch.no_grad()
    def answer_signals(self, stats: Stats, answer_embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Every answer signal (``loglik``, ``pmi``, ``consensus``; higher = more
        plausible) of answers given by their raw embeddings ``[N, E]``."""
        mix = self.ssd.mixture(self._hidden(stats), "answer")
        z = self.project(answer_embeddings).to(mix.means.device)
        if not self.ssd.manifest.heads["answer"].whitened:
            dim = z.shape[-1]
            z = z * self.ssd.embedder.pca.scale[:dim].to(z.device)
        sig = self.ssd.signals_of(mix, z.unsqueeze(1))
        return {k: v[:, 0].detach().double().cpu().numpy() for k, v in sig.items()}

    def score_answers(self, stats: Stats, signal: str = "loglik") -> np.ndarray:
        """Risk of the default answer: minus its answer signal (log-likelihood default)."""
        stats.require(self.answer_needs, self.name)
        assert stats.default_embeddings is not None
        if signal == "loglik":
            return -self.loglik(stats, stats.default_embeddings)
        return -self.answer_signals(stats, stats.default_embeddings)[signal]

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        return list(self.ssd.score_prompts(list(prompts), formatted=True))
