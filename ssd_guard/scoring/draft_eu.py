"""`DraftEUScorer`: token-level epistemic uncertainty from distilled draft models
(after arXiv 2602.01956), aggregated to a hallucination probability.

For every answer token ``t`` (next-token distributions at the positions that predict
it), with ``K`` Data-Diverse Drafts ``q_1..q_K``, their mixture ``q̄`` and the Online
Stochastic Distillation proxy ``p̃`` of the target's Bayesian model average::

    EU(t) = JSD(q_1..q_K) + KL(q̄ || p̃)       (variance + bias; nats)

(see :mod:`ssd_guard.drafts.model`). A sequence gets ``eu_mean`` / ``eu_max`` over its
answer tokens (and ``jsd_mean`` / ``kl_mean``); the artifact's logistic regression,
fitted on train-split correctness labels, maps the chosen features (``log(x + 1e-6)``,
standardised) to the probability that the answer is wrong: the ``draft_eu`` score,
higher = riskier.

The drafts read the exact text the target sees (few-shot prefix + question), then the
answer; prompt and answer are tokenised apart and their ids concatenated (the answer
with a leading space, as generated after ``Answer:``), so the boundary is exact. Rows
whose text starts with the artifact's few-shot prefix share one prefix pass per batch;
others run as they are. The scorer never needs the target's own forward pass: the
drafts use the target's embedding and head only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.drafts.artifact import (
    DraftManifest,
    check_draft_compatible,
    load_draft_artifact,
)
from ssd_guard.drafts.model import Draft, Segments, TargetParts, flat_logit_index, token_eu
from ssd_guard.errors import ArtifactError
from ssd_guard.scoring.ssd import apply_prompt_format
from ssd_guard.scoring.token_stats import answer_token_ids

__all__ = ["FEATURES", "DraftEUScorer", "lr_probability"]

#: Sequence-level statistics ``score_pairs_all`` returns beside ``draft_eu``.
FEATURES = ("eu_mean", "eu_max", "jsd_mean", "kl_mean")
_EPS = 1e-6


def lr_probability(
    feats: np.ndarray, tensors: dict[str, torch.Tensor], log_features: bool
) -> np.ndarray:
    """``sigmoid(((f - mean) / scale) @ coef + intercept)`` for features ``[N, F]``."""
    x = np.log(feats + _EPS) if log_features else feats
    mean = tensors["lr.mean"].double().numpy()
    scale = tensors["lr.scale"].double().numpy()
    coef = tensors["lr.coef"].double().numpy()
    b = float(tensors["lr.intercept"].double().numpy().reshape(-1)[0])
    z = ((x - mean) / scale) @ coef + b
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def build_drafts(
    parts: TargetParts,
    layers: Sequence[int],
    tensors: dict[str, torch.Tensor],
    n_drafts: int,
) -> tuple[list[Draft], Draft]:
    """The ``K`` drafts and the proxy from stored ``draft.<k>.*`` / ``proxy.*`` tensors,
    in the target's dtype and on its device (inference only)."""

    def one(prefix: str) -> Draft:
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise ArtifactError(f"draft artifact holds no tensors for {prefix.rstrip('.')}")
        d = Draft(parts, layers)
        try:
            d.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise ArtifactError(f"draft artifact: {prefix.rstrip('.')}: {exc}") from exc
        d = d.to(device=parts.device, dtype=parts.dtype).eval()
        for p in d.parameters():
            p.requires_grad_(False)
        return d

    return [one(f"draft.{k}.") for k in range(n_drafts)], one("proxy.")


class DraftEUScorer:
    """Score ``(prompt, answer)`` pairs by the drafts' epistemic-uncertainty estimate."""

    name = "DraftEU"
    signal = "draft_eu"

    def __init__(
        self,
        manifest: DraftManifest,
        tensors: dict[str, torch.Tensor],
        lm: Any,
        *,
        batch_size: int = 16,
        verify: bool = True,
    ) -> None:
        parts = TargetParts(lm.model)
        if verify:
            check_draft_compatible(
                manifest,
                model_id=getattr(lm, "model_id", None),
                fingerprint=getattr(lm, "fingerprint", None),
                hidden_size=parts.hidden_size,
                num_layers=parts.num_layers,
            )
        self.manifest = manifest
        self.parts = parts
        self.tokenizer = lm.tokenizer
        self.batch_size = batch_size
        self.drafts, self.proxy = build_drafts(parts, manifest.layers, tensors, manifest.n_drafts)
        self._lr = {k: v for k, v in tensors.items() if k.startswith("lr.")}
        self.calibration: dict[str, list[float]] = {
            key.split(".", 1)[1]: sorted(v.double().tolist())
            for key, v in tensors.items()
            if key.startswith("calibration.")
        }
        self.fingerprint = manifest.base_model.fingerprint
        self.model_id = manifest.base_model.id
        few = manifest.prompt.few_shot
        self._prefix: list[int] = []
        if few:
            from ssd_guard.encoding import prefix_length

            n = prefix_length(self.tokenizer, few)
            self._prefix = [int(i) for i in self.tokenizer(few + "Question:")["input_ids"][:n]]

    @classmethod
    def load(cls, artifact_dir: str | Path, lm: Any, *, batch_size: int = 16) -> DraftEUScorer:
        """Load an artifact for ``lm`` (a :class:`ssd_guard.models.LoadedModel`);
        refuses (``ArtifactMismatchError``) a target other than the one distilled."""
        manifest, tensors = load_draft_artifact(artifact_dir)
        return cls(manifest, tensors, lm, batch_size=batch_size)

    # ------------------------------------------------------------------ text
    def format_prompt(self, prompt: str) -> str:
        """Few-shot prefix + template, as in training (bare question or ``Question: ...``)."""
        fmt = self.manifest.prompt
        return apply_prompt_format(prompt, fmt.few_shot, fmt.template)

    def answer_ids(self, answer: str) -> list[int]:
        return answer_token_ids(self.tokenizer, answer, self.manifest.max_answer_tokens)

    def _split(self, text: str) -> tuple[bool, list[int]]:
        ids = [int(i) for i in self.tokenizer(text)["input_ids"]]
        n = len(self._prefix)
        if n and len(ids) > n and ids[:n] == self._prefix:
            return True, ids[n:]
        return False, ids

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def token_scores(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> list[dict[str, np.ndarray] | None]:
        """Per row: ``{"eu", "jsd", "kl"}`` arrays over the answer tokens (``None`` for an
        empty answer)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        out: list[dict[str, np.ndarray] | None] = [None] * len(prompts)
        items: dict[bool, list[tuple[int, list[int], list[int]]]] = {True: [], False: []}
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            a_ids = self.answer_ids(a)
            if not a_ids:
                continue
            text = p if formatted else self.format_prompt(p)
            use_prefix, q_ids = self._split(text)
            if not q_ids:
                continue
            items[use_prefix].append((i, q_ids, a_ids))
        dev = self.parts.device
        for use_prefix, rows in items.items():
            prefix = self._prefix if use_prefix else []
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                seg = Segments.build(
                    prefix,
                    [q for _, q, _ in chunk],
                    [a for _, _, a in chunk],
                    list(range(len(chunk))),
                    pad=0,
                ).to(dev)
                logq = torch.stack([self._logprobs(d, seg) for d in self.drafts])
                logp = self._logprobs(self.proxy, seg)
                res = {k: v.double().cpu().numpy() for k, v in token_eu(logq, logp).items()}
                _, _, per_row = flat_logit_index(seg)
                for (i, _, _), idx in zip(chunk, per_row):
                    out[i] = {k: v[idx] for k, v in res.items()}
        return out

    @staticmethod
    def _logprobs(draft: Draft, seg: Segments) -> torch.Tensor:
        states, _ = draft.forward_states(seg)
        return torch.log_softmax(draft.logits(states).float(), dim=-1)

    def sequence_features(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> np.ndarray:
        """``[N, 4]`` sequence statistics (columns :data:`FEATURES`); NaN rows for empty
        answers."""
        feats = np.full((len(prompts), len(FEATURES)), np.nan)
        for i, tok in enumerate(self.token_scores(prompts, answers, formatted=formatted)):
            if tok is None:
                continue
            feats[i] = [tok["eu"].mean(), tok["eu"].max(), tok["jsd"].mean(), tok["kl"].mean()]
        return feats

    def score_pairs_all(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> dict[str, list[float]]:
        """``draft_eu`` (the LR probability of a wrong answer) and the raw statistics."""
        feats = self.sequence_features(prompts, answers, formatted=formatted)
        cols = [FEATURES.index(f) for f in self.manifest.aggregate.features]
        prob = np.full(len(prompts), np.nan)
        ok = ~np.isnan(feats).any(axis=1)
        if ok.any():
            prob[ok] = lr_probability(
                feats[ok][:, cols], self._lr, self.manifest.aggregate.log_features
            )
        out = {"draft_eu": [float(x) for x in prob]}
        for j, name in enumerate(FEATURES):
            out[name] = [float(x) for x in feats[:, j]]
        return out

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, formatted: bool = False
    ) -> list[float]:
        """Probability that each answer is wrong (higher = riskier; NaN if empty)."""
        return self.score_pairs_all(prompts, answers, formatted=formatted)["draft_eu"]
