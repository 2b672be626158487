"""`SSDScorer`: prompt encoder + student + answer embedder, in one object.

One forward pass of the base model up to layer ``l`` (or none, when the hidden state
was captured during the guarded model's own prefill) gives a Gaussian mixture over
the embeddings of the answers the model would give:

* ``score_prompts`` — Rényi-2 entropy of the risk head (pre-generation risk);
* ``score_answers`` — log-likelihood of answers under the answer head (post-generation
  check, poisoned content, multiple-choice selection); with ``signal="pmi"`` the
  pointwise mutual information ``log p(a | prompt) - log p(a)`` against the artifact's
  unconditional answer density, so answers that are likely *everywhere* stop winning;
* ``answer_signals`` — every answer signal of one pass (``loglik``, ``pmi``,
  ``consensus``: minus the distance to the mixture mean);
* ``consensus`` — the mixture mean (semantic consensus, PCA space);
* ``prompt_signals`` / ``answer_signals(with_risk=True)`` — also the combined ``risk``
  (P(the default answer is wrong), :mod:`ssd_guard.scoring.risk`) when the artifact holds
  a ``risk.safetensors`` (``ssd-guard fit-risk``).

Every method that needs a prompt's hidden state takes ``stats=``, a
:class:`~ssd_guard.scoring.callstats.CallStats` of the guarded call: the state is then
computed once per call (or handed over by the call's ``hidden_provider``, e.g. from the
generation's own prefill) and reused by every later check of that call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ssd_guard.answers import answer_core, chat_prompt, core_span, normalise_answer, question_of
from ssd_guard.artifact import Manifest, bundled_artifact_path, check_compatible, load_artifact
from ssd_guard.encoding import AnswerEmbedder, PCAProjection, PromptEncoder
from ssd_guard.errors import ArtifactError
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.callstats import CallStats
from ssd_guard.scoring.risk import RiskModel, load_risk_model
from ssd_guard.scoring.token_stats import CALLSTATS_KEY
from ssd_guard.student import SSDStudent

__all__ = ["ANSWER_SIGNALS", "SSDScorer", "apply_prompt_format", "build_heads", "load_marginal"]

#: Answer signals of one pass (higher = more plausible for each).
ANSWER_SIGNALS = ("loglik", "pmi", "consensus")


def load_marginal(tensors: dict[str, torch.Tensor]) -> GaussianMixture | None:
    """The unconditional answer density stored as ``marginal.{weights,means,scales}``."""
    if "marginal.weights" not in tensors:
        return None
    return GaussianMixture(
        tensors["marginal.weights"].float().unsqueeze(0),
        tensors["marginal.means"].float().unsqueeze(0),
        tensors["marginal.scales"].float().unsqueeze(0),
    )


def bare_question(prompt: str) -> str:
    """The question of a prompt given bare or in ``Question: ...\nAnswer:`` form."""
    text = prompt.strip()
    if text.startswith("Question:"):
        text = text[len("Question:") :].strip()
    if text.endswith("Answer:"):
        text = text[: -len("Answer:")].strip()
    return text


def apply_prompt_format(prompt: str, few_shot: str, template: str) -> str:
    """``few_shot`` + ``template`` with ``{question}`` the prompt's question: the prompt
    may be a bare question or already in ``Question: ...\nAnswer:`` form."""
    return few_shot + template.replace("{question}", bare_question(prompt))


def build_heads(
    manifest: Manifest, tensors: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> dict[str, SSDStudent]:
    heads = {}
    for name, info in manifest.heads.items():
        prefix = f"heads.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise ArtifactError(f"artifact lists head {name!r} but holds no tensors for it")
        config = {
            "in_dim": manifest.feature_spec.in_dim(manifest.base_model.hidden_size),
            "out_dim": info.dim,
            "n_components": info.n_components,
            "hidden": info.hidden,
            "depth": info.depth,
            "min_scale": info.min_scale,
            "val_nll": info.val_nll,
        }
        heads[name] = SSDStudent.from_state(config, state, device=device)
    return heads


class SSDScorer:
    """Score prompts and answers with a distilled SSD student.

    Build it with :meth:`load` (which loads the base model and embedder named by the
    artifact, once per process) or directly from parts. Prompts are the user's text
    (e.g. a question); the artifact's prompt format (few-shot prefix + template) is
    applied unless ``formatted=True``.
    """

    name = "ssd"

    def __init__(
        self,
        manifest: Manifest,
        tensors: dict[str, torch.Tensor],
        *,
        model: Any,
        tokenizer: Any,
        embedder: Any,
        model_id: str | None = None,
        model_fingerprint: str | None = None,
        batch_size: int = 16,
        verify: bool = True,
        risk_model: RiskModel | None = None,
    ) -> None:
        hidden_size = int(
            (
                model.config.get_text_config()
                if hasattr(model.config, "get_text_config")
                else model.config
            ).hidden_size
        )
        get_dim = (
            getattr(embedder, "get_embedding_dimension", None)
            or embedder.get_sentence_embedding_dimension
        )
        if verify:
            check_compatible(
                manifest,
                model_id=model_id,
                fingerprint=model_fingerprint,
                hidden_size=hidden_size,
                embedder_dim=int(get_dim()),
            )
        self.manifest = manifest
        self.device = next(model.parameters()).device
        self.encoder = PromptEncoder(
            model, tokenizer, features=manifest.feature_spec, batch_size=batch_size
        )
        self.embedder = AnswerEmbedder(embedder, PCAProjection.from_tensors(tensors))
        self.heads = build_heads(manifest, tensors, device=self.device)
        marginal = load_marginal(tensors)
        self.marginal = marginal.to(self.device) if marginal is not None else None
        self.calibration: dict[str, list[float]] = {
            key.split(".", 1)[1]: sorted(v.tolist())
            for key, v in tensors.items()
            if key.startswith("calibration.")
        }
        self.model_id = model_id or manifest.base_model.id
        self.model_fingerprint = model_fingerprint
        self.fingerprint = manifest.fingerprint
        self.layer = manifest.layer
        self.risk_model: RiskModel | None = None
        if risk_model is not None:
            self.set_risk_model(risk_model)

    def set_risk_model(self, risk_model: RiskModel | None) -> None:
        """Attach (or, with ``None``, detach) the combined-risk model; refused when it was
        fitted for another student. Its validation values join :attr:`calibration` as
        ``risk:pre`` / ``risk:post`` / ``risk:post_gen``."""
        from ssd_guard.errors import ArtifactMismatchError

        for key in [k for k in self.calibration if k.startswith("risk:")]:
            del self.calibration[key]
        self.risk_model = risk_model
        if risk_model is None:
            return
        if risk_model.student_fingerprint != self.fingerprint:
            self.risk_model = None
            raise ArtifactMismatchError(
                f"the risk model was fitted for the student {risk_model.student_fingerprint}, "
                f"not for this one ({self.fingerprint}): re-run `ssd-guard fit-risk`"
            )
        self.calibration.update(risk_model.calibration)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        artifact: str | Path = "bundled",
        *,
        lm: Any = None,
        embedder: Any = None,
        device: str | None = None,
        dtype: str | None = "auto",
        base_model: str | None = None,
        batch_size: int = 16,
        embedder_dtype: str | None = "auto",
    ) -> SSDScorer:
        """Load an artifact with its base model and embedder (shared per process).

        ``lm`` (a :class:`ssd_guard.models.LoadedModel`) and ``embedder`` (a
        SentenceTransformer) may be passed to reuse models already in memory;
        ``base_model`` overrides the model to load (it must match the artifact).
        ``embedder_dtype`` (``"auto"`` = bf16, like the base model): a one-answer
        embedding is bound by weight traffic on CPU, and bf16 halves it; on the bundled
        student the answer log-likelihoods keep their order (Spearman 0.9998 against
        fp32 on 128 answers, median absolute change 0.05 for a spread of 10.5:
        ``benchmarks/embedder_dtype.py``). Pass ``"fp32"`` for bit-for-bit the
        distillation's embeddings.
        """
        from ssd_guard.models import shared_causal_lm, shared_embedder

        manifest, tensors = load_artifact(artifact)
        art_dir = bundled_artifact_path() if str(artifact) == "bundled" else Path(artifact)
        risk_model = load_risk_model(art_dir, manifest.fingerprint)
        if lm is None:
            lm = shared_causal_lm(base_model or manifest.base_model.id, device=device, dtype=dtype)
        if embedder is None:
            embedder = shared_embedder(manifest.embedder.id, device=device, dtype=embedder_dtype)
        return cls(
            manifest,
            tensors,
            model=lm.model,
            tokenizer=lm.tokenizer,
            embedder=embedder,
            model_id=lm.model_id,
            model_fingerprint=lm.fingerprint,
            batch_size=batch_size,
            risk_model=risk_model,
        )

    @classmethod
    def from_policy(cls, policy: Any, **kwargs: Any) -> SSDScorer:
        """Load what *policy* (a :class:`~ssd_guard.policy.Policy`) names: its ``student``
        artifact (``bundled`` or a directory, relative to the policy file), with its
        ``proxy_model`` as the base model when it names one. *kwargs* go to :meth:`load`
        (``device``, ``dtype``...).

        **A proxy's scores describe the proxy, not the model that answers**: the guard
        then reads the hidden states of ``proxy_model`` for prompts an API model
        answers, and records ``hidden_state_source: proxy:<model>``.
        """
        from ssd_guard.policy.loading import resolve_proxy_model, resolve_student

        proxy = resolve_proxy_model(policy)
        if proxy is not None:
            kwargs.setdefault("base_model", proxy)
        return cls.load(resolve_student(policy), **kwargs)

    # ------------------------------------------------------------------ text helpers
    def format_prompt(self, prompt: str) -> str:
        """Few-shot prefix + template, as during distillation.

        The text may be a bare question or already in ``Question: ...\nAnswer:`` form.
        """
        fmt = self.manifest.prompt
        if fmt.chat:  # the user message in the base model's chat template, as distilled
            return chat_prompt(self.encoder.tokenizer, bare_question(prompt), fmt.system)
        return apply_prompt_format(prompt, fmt.few_shot, fmt.template)

    def hidden(
        self,
        prompts: Sequence[str],
        *,
        formatted: bool = False,
        stats: CallStats | None = None,
    ) -> torch.Tensor:
        """``[B, F]`` prompt representations: the student's input features.

        Without *stats*, a truncated prefill up to the deepest layer read. With the call's
        *stats*, each prompt's state is computed once per call (by its ``hidden_provider``
        when it has one, e.g. a generation's own prefill) and reused afterwards; a prompt
        cut to the encoder's ``max_tokens`` sets ``stats.truncated``.
        """
        texts = list(prompts) if formatted else [self.format_prompt(p) for p in prompts]
        if stats is None:
            return self.encoder.encode(texts)
        rows = stats.compute(
            f"hidden:{self.fingerprint}", texts, lambda missing: self._hidden_rows(missing, stats)
        )
        return torch.cat([r.to(self.device) for r in rows]) if rows else self.encoder.encode([])

    def _hidden_rows(self, texts: list[str], stats: CallStats) -> list[torch.Tensor]:
        if stats.hidden_provider is not None:
            h = stats.hidden_provider(texts)
        else:
            cut: list[bool] = []
            h = self.encoder.encode(texts, cut=cut)
            stats.forwards += math.ceil(len(texts) / self.encoder.batch_size)
            if any(cut):
                stats.truncated = True
        rows = torch.as_tensor(h).float()
        return [rows[i : i + 1] for i in range(int(rows.shape[0]))]

    @property
    def features(self) -> Any:
        """The :class:`~ssd_guard.features.FeatureSpec` the student reads."""
        return self.manifest.feature_spec

    # ------------------------------------------------------------------ signals
    def mixture(self, hidden: torch.Tensor, head: str = "risk") -> GaussianMixture:
        if head not in self.heads:
            raise KeyError(f"no head {head!r}; this artifact has {sorted(self.heads)}")
        return self.heads[head].predict(hidden.to(self.device))

    def entropy_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rényi-2 entropy ``[B]`` from precomputed hidden states (no LM pass)."""
        return self.mixture(hidden, "risk").renyi2_entropy()

    def loglik_from_hidden(self, hidden: torch.Tensor, answer_z: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of projected answers ``[B, d]`` or ``[B, N, d]``."""
        return self.mixture(hidden, "answer").log_prob(answer_z.to(self.device))

    def score_prompts(
        self, prompts: Sequence[str], *, formatted: bool = False, stats: CallStats | None = None
    ) -> list[float]:
        """Pre-generation risk: Rényi-2 entropy per prompt (higher = riskier)."""
        _check_sequence("prompts", prompts)
        if not prompts:
            return []
        h = self.hidden(prompts, formatted=formatted, stats=stats)
        return [float(v) for v in self.entropy_from_hidden(h).cpu().tolist()]

    def prompt_signals(
        self, prompts: Sequence[str], *, formatted: bool = False, stats: CallStats | None = None
    ) -> dict[str, list[float]]:
        """Every pre-generation signal of one pass: ``entropy``, and ``risk`` (the
        combined model's ``pre`` variant) when the artifact has a risk model."""
        _check_sequence("prompts", prompts)
        if not prompts:
            return {"entropy": []}
        h = self.hidden(prompts, formatted=formatted, stats=stats)
        ent = self.entropy_from_hidden(h)
        out = {"entropy": [float(v) for v in ent.cpu().tolist()]}
        if self.risk_model is not None:
            risk, _ = self.risk_model.predict(h, ent)
            out["risk"] = [float(v) for v in risk.cpu().tolist()]
        return out

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
        if self.manifest.answers.normalise:
            return [normalise_answer(a) for a in answers]
        return [a.strip() for a in answers]

    def embed_answers(self, answers: Sequence[str], head: str = "answer") -> torch.Tensor:
        """Answers projected into *head*'s target space (``[N, d]``)."""
        dim = self.heads[head].dim_
        z = self.embedder.embed(self.prepare_answers(answers), dim=dim)
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
        _check_sequence("prompts", prompts)
        _check_sequence("answers", answers)
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer entries")
        if not prompts:
            empty: dict[str, list[float]] = {k: [] for k in ANSWER_SIGNALS}
            return empty
        single = all(isinstance(a, str) for a in answers)
        lists = [[a] if isinstance(a, str) else list(a) for a in answers]
        for lst in lists:
            _check_sequence("answers", lst, strings=True)
        h = self.hidden(prompts, formatted=formatted, stats=stats) if hidden is None else hidden
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
                    core = core_span(question, self.prepare_answers([a])[0])
                    if core is not None:
                        texts.append(core)
                        owner.append((i, j))
        z_flat = self.embed_answers(texts) if texts else torch.empty(0)
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

    def consensus(
        self, prompts: Sequence[str], *, formatted: bool = False, stats: CallStats | None = None
    ) -> torch.Tensor:
        """Mixture mean ``[B, d]`` of the answer head, in PCA space."""
        h = self.hidden(prompts, formatted=formatted, stats=stats)
        return self.mixture(h, "answer").mean()

    def __repr__(self) -> str:
        return (
            f"SSDScorer(model={self.model_id!r}, layer={self.layer}, "
            f"heads={ {k: v.dim_ for k, v in self.heads.items()} }, "
            f"fingerprint={self.fingerprint!r})"
        )


def _check_sequence(name: str, value: object, *, strings: bool = False) -> None:
    """A list of prompts / answers must not be a bare string (it would be split into
    characters) and must hold strings."""
    from ssd_guard.errors import GuardInputError

    if isinstance(value, (str, bytes)):
        raise GuardInputError(
            name, f"{name}: expected a list of strings, got a single {type(value).__name__}"
        )
    if strings or name == "prompts":
        for i, v in enumerate(cast(Sequence[object], value)):
            if not isinstance(v, str):
                raise GuardInputError(
                    f"{name}[{i}]", f"{name}[{i}]: expected a string, got {type(v).__name__}"
                )
