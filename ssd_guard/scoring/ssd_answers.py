"""The answer side of :class:`~ssd_guard.scoring.ssd.SSDScorer`: answer embeddings and
every answer signal of one pass (``loglik``, ``pmi``, ``consensus``, the combined
``risk``), as a mixin the scorer is built on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ssd_guard.answers import answer_core, core_span, normalise_answer, question_of
from ssd_guard.artifact import Manifest
from ssd_guard.encoding import AnswerEmbedder, check_text_lists, check_texts
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.callstats import CallStats
from ssd_guard.scoring.risk import RiskModel
from ssd_guard.scoring.token_stats import CALLSTATS_KEY
from ssd_guard.signals import by_provider
from ssd_guard.student import SSDStudent

#: Answer signals of one pass (higher = more plausible for each).
#: The answer signals one student pass gives (the registry's ``scorer`` answer signal and
#: its ``answer_signals`` ones, :mod:`ssd_guard.signals`).
ANSWER_SIGNALS: tuple[str, ...] = ("loglik", *by_provider("answer_signals"))


class _AnswerSignals:
    """Answer embedding and scoring; the state and the prompt side are
    :class:`~ssd_guard.scoring.ssd.SSDScorer`'s (declared here for the type checker)."""

    manifest: Manifest
    heads: dict[str, SSDStudent]
    embedder: AnswerEmbedder
    marginal: GaussianMixture | None
    device: torch.device
    risk_model: RiskModel | None

    if TYPE_CHECKING:

        def mixture(self, hidden: torch.Tensor, head: str = "risk") -> GaussianMixture: ...

        def entropy_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor: ...

        def _hidden(
            self, prompts: list[str], *, formatted: bool, stats: CallStats | None
        ) -> torch.Tensor: ...

    def _answer_risk(
        self,
        h: torch.Tensor,
        prompts: Sequence[str],
        lists: list[list[str]],
        best: dict[str, torch.Tensor],
        stats: CallStats | None,
    ) -> torch.Tensor:
        """``[B, N]`` combined risk of every candidate (``post`` variant, ``post_gen`` for
        the answers whose generation recorded its token statistics in *stats*)."""
        assert self.risk_model is not None
        ent = self.entropy_from_hidden(h)
        out = torch.full_like(best["loglik"], float("nan"))
        for j in range(out.shape[1]):
            rows = [i for i, lst in enumerate(lists) if j < len(lst)]
            if not rows:
                continue
            idx = torch.tensor(rows)
            sig = {k: best[k][idx, j].to(h.device) for k in ANSWER_SIGNALS}
            recorded = [
                None if stats is None else stats.get(CALLSTATS_KEY, lists[i][j]) for i in rows
            ]
            hh, ee = h[idx.to(h.device)], ent[idx.to(ent.device)]
            if all(r is not None for r in recorded):
                ts = torch.tensor([list(r) for r in recorded if r is not None])
                risk, _ = self.risk_model.predict(hh, ee, sig, ts)
            else:
                risk, _ = self.risk_model.predict(hh, ee, sig)
            out[idx, j] = risk.float().cpu()
        return out

    def prepare_answers(self, answers: Sequence[str]) -> list[str]:
        """The answer texts as the student's teacher saw them (normalised if the
        artifact says so)."""
        return self._prepare(check_texts("answers", answers))

    def _prepare(self, answers: list[str]) -> list[str]:
        if self.manifest.answers.normalise:
            return [normalise_answer(a) for a in answers]
        return [a.strip() for a in answers]

    def embed_answers(self, answers: Sequence[str], head: str = "answer") -> torch.Tensor:
        """Answers projected into *head*'s target space (``[N, d]``)."""
        return self._embed(check_texts("answers", answers), head)

    def _embed(self, answers: list[str], head: str = "answer") -> torch.Tensor:
        dim = self.heads[head].dim_
        z = self.embedder.embed(self._prepare(answers), dim=dim)
        if not self.manifest.heads[head].whitened and self.embedder.pca is not None:
            z = z * self.embedder.pca.scale[:dim]  # plain PCA coordinates
        return z

    def signals_of(self, mix: GaussianMixture, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every answer signal for ``z [B, N, d]`` under ``mix`` (``[B]`` mixtures)."""
        z = z.to(self.device)
        ll = mix.log_prob(z)
        out = {"loglik": ll}
        if self.marginal is not None:
            b, n, d = z.shape
            marg = self.marginal.log_prob(z.reshape(1, b * n, d)).reshape(b, n)
            out["pmi"] = ll - marg
        else:
            out["pmi"] = ll
        out["consensus"] = -(z - mix.mean().unsqueeze(1)).pow(2).sum(-1).sqrt()
        return out

    def answer_signals(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        *,
        formatted: bool = False,
        hidden: torch.Tensor | None = None,
        stats: CallStats | None = None,
        with_risk: bool = False,
    ) -> dict[str, list[float]] | dict[str, list[list[float]]]:
        """All answer signals of one pass: ``{"loglik", "pmi", "consensus"}``, each shaped
        like :meth:`score_answers`' result (higher = more plausible for every signal).
        With *with_risk* and a risk model, also ``risk`` (P(wrong), higher = riskier).

        A sentence-length answer is also scored on its core span (the words that do not
        restate the question) when the artifact enables it; each signal takes the better
        of the two, so the form of an answer matters less than its content. The prompts'
        states are *hidden* when given, else :meth:`hidden` (with the call's *stats*).
        """
        prompts = check_texts("prompts", prompts)
        entries = check_text_lists("answers", answers)
        if len(prompts) != len(entries):
            raise ValueError(f"{len(prompts)} prompts but {len(entries)} answer entries")
        if not prompts:
            empty: dict[str, list[float]] = {k: [] for k in ANSWER_SIGNALS}
            return empty
        single = all(isinstance(a, str) for a in entries)
        lists = [[a] if isinstance(a, str) else a for a in entries]
        h = (
            hidden
            if hidden is not None
            else self._hidden(prompts, formatted=formatted, stats=stats)
        )
        mix = self.mixture(h, "answer")
        # Candidate texts per answer: the answer itself, plus its core span.
        texts: list[str] = []
        owner: list[tuple[int, int]] = []
        use_core = self.manifest.answers.core_span
        core_embed = self.manifest.answers.core_embed
        for i, (p, lst) in enumerate(zip(prompts, lists)):
            question = question_of(p)
            for j, a in enumerate(lst):
                if core_embed:  # the student models answer cores: embed exactly that
                    texts.append(answer_core(question, a))
                    owner.append((i, j))
                    continue
                texts.append(a)
                owner.append((i, j))
                if use_core:
                    core = core_span(question, self._prepare([a])[0])
                    if core is not None:
                        texts.append(core)
                        owner.append((i, j))
        z_flat = self._embed(texts) if texts else torch.empty(0)
        n_max = max((len(lst) for lst in lists), default=0)
        best = {k: torch.full((len(lists), max(n_max, 1)), -torch.inf) for k in ANSWER_SIGNALS}
        # Group the candidate embeddings per prompt: [B, M, d] with padding.
        per_prompt: list[list[int]] = [[] for _ in lists]
        for row, (i, _j) in enumerate(owner):
            per_prompt[i].append(row)
        m_max = max((len(r) for r in per_prompt), default=0)
        if m_max:
            d = z_flat.shape[-1]
            z = torch.zeros(len(lists), m_max, d, device=z_flat.device)
            for i, rows in enumerate(per_prompt):
                if rows:
                    z[i, : len(rows)] = z_flat[rows]
            sig = {k: v.cpu() for k, v in self.signals_of(mix, z).items()}
            for i, rows in enumerate(per_prompt):
                for col, row in enumerate(rows):
                    j = owner[row][1]
                    for k in ANSWER_SIGNALS:
                        best[k][i, j] = torch.maximum(best[k][i, j], sig[k][i, col])
        if with_risk and self.risk_model is not None:
            best["risk"] = self._answer_risk(h, prompts, lists, best, stats)
        if single:
            return {k: v[:, 0].tolist() for k, v in best.items()}
        return {
            k: [v[i, : len(lst)].tolist() for i, lst in enumerate(lists)] for k, v in best.items()
        }

    def score_answers(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        *,
        formatted: bool = False,
        hidden: torch.Tensor | None = None,
        signal: str = "loglik",
        stats: CallStats | None = None,
    ) -> list[float] | list[list[float]]:
        """Post-generation check: one answer signal per answer (higher = more plausible).

        ``signal`` is ``"loglik"`` (log-likelihood under the prompt's mixture),
        ``"pmi"`` (that minus the unconditional answer log-density) or ``"consensus"``
        (minus the distance to the mixture mean). ``answers`` holds one string per
        prompt (returns ``list[float]``) or a list of candidate strings per prompt
        (returns ``list[list[float]]``; lists may differ in length).
        """
        if signal not in ANSWER_SIGNALS:
            raise ValueError(f"unknown answer signal {signal!r}; choose from {ANSWER_SIGNALS}")
        return self.answer_signals(
            prompts, answers, formatted=formatted, hidden=hidden, stats=stats
        )[signal]
