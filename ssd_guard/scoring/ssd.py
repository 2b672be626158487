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

Every entry point checks its text arguments with the guard's own checks
(:func:`~ssd_guard.encoding.check_texts`): ``None``, ``bytes``, a single string where a
list is expected or a lone surrogate raises :class:`~ssd_guard.errors.GuardInputError`
naming the argument and index (``"answers[0] must be a str or a list of str, got
NoneType"``). A formatted prompt longer than ``max_prompt_tokens`` (the artifact's
``prompt.max_tokens``, else :data:`~ssd_guard.artifact.DEFAULT_MAX_PROMPT_TOKENS`) keeps
its last ``max_prompt_tokens`` tokens, logged and flagged ``truncated`` on the call's
audit events (``on_long_prompt="truncate"``, the default), or is refused with a
``GuardInputError`` (``on_long_prompt="error"``); either way only a bounded window of its
characters is tokenized.

:func:`read_student` / :func:`verify_artifact` run the checks :meth:`SSDScorer.load`
runs (``ssd-guard artifact`` prints the manifest once they pass); reading the artifact is
:mod:`~ssd_guard.scoring.ssd_artifact`'s job, the answer signals
:mod:`~ssd_guard.scoring.ssd_answers`'.

Every method that needs a prompt's hidden state takes ``stats=``, a
:class:`~ssd_guard.scoring.callstats.CallStats` of the guarded call: the state is then
computed once per call (or handed over by the call's ``hidden_provider``, e.g. from the
generation's own prefill) and reused by every later check of that call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import torch

from ssd_guard.answers import chat_prompt
from ssd_guard.artifact import Manifest, check_compatible
from ssd_guard.encoding import (
    AnswerEmbedder,
    PromptEncoder,
    check_text,
    check_texts,
)
from ssd_guard.errors import ArtifactMismatchError, GuardInputError
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.callstats import CallStats
from ssd_guard.scoring.risk import RiskModel
from ssd_guard.scoring.ssd_answers import ANSWER_SIGNALS, _AnswerSignals
from ssd_guard.scoring.ssd_artifact import (
    StudentArtifact,
    _student_parts,
    apply_prompt_format,
    bare_question,
    build_heads,
    load_marginal,
    read_student,
)

__all__ = [
    "ANSWER_SIGNALS",
    "LONG_PROMPT_POLICIES",
    "SSDScorer",
    "StudentArtifact",
    "apply_prompt_format",
    "build_heads",
    "load_marginal",
    "read_student",
    "verify_artifact",
]

#: What a prompt longer than ``max_prompt_tokens`` gets: its last tokens scored (logged,
#: ``truncated`` on the audit events), or a :class:`~ssd_guard.errors.GuardInputError`.
LONG_PROMPT_POLICIES = ("truncate", "error")
LongPromptPolicy = Literal["truncate", "error"]


class LoadKwargs(TypedDict, total=False):
    """The keywords of :meth:`SSDScorer.load` (see there; defaults in brackets): ``lm``,
    ``embedder`` (models already in memory), ``device``, ``dtype`` [``"auto"``],
    ``base_model``, ``batch_size`` [16], ``embedder_dtype`` [``"auto"``],
    ``max_prompt_tokens`` [the manifest's], ``on_long_prompt`` [``"truncate"``]."""

    lm: Any
    embedder: Any
    device: str | None
    dtype: str | None
    base_model: str | None
    batch_size: int
    embedder_dtype: str | None
    max_prompt_tokens: int | None
    on_long_prompt: LongPromptPolicy


def verify_artifact(
    artifact: str | Path = "bundled",
    *,
    models: bool = True,
    device: str | None = "cpu",
    base_model: str | None = None,
) -> StudentArtifact:
    """Run the checks :meth:`SSDScorer.load` runs, in its order and with its errors:
    :func:`read_student`, then (``models=True``) load the base model and embedder the
    manifest names and check the artifact against them (base-model fingerprint, hidden
    size, layers read, embedder dimension). ``ssd-guard artifact`` calls this."""
    student = read_student(artifact)
    if models:
        SSDScorer._from_student(student, device=device, base_model=base_model)
    return student


class SSDScorer(_AnswerSignals):
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
        max_prompt_tokens: int | None = None,
        on_long_prompt: LongPromptPolicy = "truncate",
    ) -> None:
        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        hidden_size = int(cfg.hidden_size)
        if on_long_prompt not in LONG_PROMPT_POLICIES:
            raise ValueError(
                f"on_long_prompt must be one of {LONG_PROMPT_POLICIES}, got {on_long_prompt!r}"
            )
        ctx = getattr(cfg, "max_position_embeddings", None)
        context = int(ctx) if isinstance(ctx, int) and ctx > 0 else None
        if max_prompt_tokens is not None and not (
            isinstance(max_prompt_tokens, int) and max_prompt_tokens >= 1
        ):
            raise ValueError(f"max_prompt_tokens must be an int >= 1, got {max_prompt_tokens!r}")
        if max_prompt_tokens is not None and context is not None and max_prompt_tokens > context:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} exceeds the base model's context "
                f"({context} tokens)"
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
        try:
            self.encoder = PromptEncoder(
                model,
                tokenizer,
                features=manifest.feature_spec,
                batch_size=batch_size,
                max_tokens=max_prompt_tokens or manifest.prompt_token_limit(context),
            )
        except ValueError as exc:  # a layer read that the base model does not have
            raise ArtifactMismatchError(f"student artifact does not match: {exc}") from exc
        #: what a prompt longer than :attr:`max_prompt_tokens` gets (``truncate``/``error``)
        self.on_long_prompt: LongPromptPolicy = on_long_prompt
        heads, pca, marginal = _student_parts(manifest, tensors, self.device)
        self.embedder = AnswerEmbedder(embedder, pca)
        self.heads = heads
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

    @property
    def max_prompt_tokens(self) -> int:
        """Most tokens of a formatted prompt that are scored (its last ones)."""
        return int(self.encoder.max_tokens)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, artifact: str | Path = "bundled", **kw: Unpack[LoadKwargs]) -> SSDScorer:
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

        ``max_prompt_tokens`` (default: the manifest's ``prompt.max_tokens``, else
        :data:`~ssd_guard.artifact.DEFAULT_MAX_PROMPT_TOKENS`, capped at the base model's
        context) bounds the tokens of a formatted prompt that are scored; a longer prompt
        keeps its last ``max_prompt_tokens`` tokens, logged and flagged ``truncated``
        (``on_long_prompt="truncate"``), or raises
        :class:`~ssd_guard.errors.GuardInputError` (``on_long_prompt="error"``).

        Every check runs before the models load (:func:`read_student`); the same checks
        back ``ssd-guard artifact`` (:func:`verify_artifact`).
        """
        return cls._from_student(read_student(artifact), **kw)

    @classmethod
    def _from_student(
        cls,
        student: StudentArtifact,
        *,
        lm: Any = None,
        embedder: Any = None,
        device: str | None = None,
        dtype: str | None = "auto",
        base_model: str | None = None,
        batch_size: int = 16,
        embedder_dtype: str | None = "auto",
        max_prompt_tokens: int | None = None,
        on_long_prompt: LongPromptPolicy = "truncate",
    ) -> SSDScorer:
        """:meth:`load`'s second half: the models, then the scorer (and its checks)."""
        from ssd_guard.models import shared_causal_lm, shared_embedder

        manifest = student.manifest
        if lm is None:
            lm = shared_causal_lm(base_model or manifest.base_model.id, device=device, dtype=dtype)
        if embedder is None:
            embedder = shared_embedder(manifest.embedder.id, device=device, dtype=embedder_dtype)
        return cls(
            manifest,
            student.tensors,
            model=lm.model,
            tokenizer=lm.tokenizer,
            embedder=embedder,
            model_id=lm.model_id,
            model_fingerprint=lm.fingerprint,
            batch_size=batch_size,
            risk_model=student.risk_model,
            max_prompt_tokens=max_prompt_tokens,
            on_long_prompt=on_long_prompt,
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
        return self._format(check_text("prompt", prompt))

    def _format(self, prompt: str) -> str:
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
        cut to :attr:`max_prompt_tokens` sets ``stats.truncated`` (with
        ``on_long_prompt="error"`` it raises :class:`~ssd_guard.errors.GuardInputError`).
        """
        return self._hidden(check_texts("prompts", prompts), formatted=formatted, stats=stats)

    def _check_lengths(self, texts: list[str]) -> None:
        """``on_long_prompt="error"``: refuse a formatted prompt over the limit (counted on
        a bounded window of its end, so a huge prompt is refused at once)."""
        if self.on_long_prompt != "error":
            return
        for i, long in enumerate(self.encoder.too_long(texts)):
            if long:
                n = self.max_prompt_tokens
                raise GuardInputError(
                    f"prompts[{i}]",
                    f"prompts[{i}] is longer than max_prompt_tokens={n} tokens once formatted "
                    f"({len(texts[i])} characters): shorten it, or use "
                    f"on_long_prompt='truncate' to score its last {n} tokens",
                )

    def _hidden(
        self, prompts: list[str], *, formatted: bool, stats: CallStats | None
    ) -> torch.Tensor:
        texts = list(prompts) if formatted else [self._format(p) for p in prompts]
        self._check_lengths(texts)
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
        prompts = check_texts("prompts", prompts)
        if not prompts:
            return []
        h = self._hidden(prompts, formatted=formatted, stats=stats)
        return [float(v) for v in self.entropy_from_hidden(h).cpu().tolist()]

    def prompt_signals(
        self, prompts: Sequence[str], *, formatted: bool = False, stats: CallStats | None = None
    ) -> dict[str, list[float]]:
        """Every pre-generation signal of one pass: ``entropy``, and ``risk`` (the
        combined model's ``pre`` variant) when the artifact has a risk model."""
        prompts = check_texts("prompts", prompts)
        if not prompts:
            return {"entropy": []}
        h = self._hidden(prompts, formatted=formatted, stats=stats)
        ent = self.entropy_from_hidden(h)
        out = {"entropy": [float(v) for v in ent.cpu().tolist()]}
        if self.risk_model is not None:
            risk, _ = self.risk_model.predict(h, ent)
            out["risk"] = [float(v) for v in risk.cpu().tolist()]
        return out

    def consensus(
        self, prompts: Sequence[str], *, formatted: bool = False, stats: CallStats | None = None
    ) -> torch.Tensor:
        """Mixture mean ``[B, d]`` of the answer head, in PCA space."""
        h = self._hidden(check_texts("prompts", prompts), formatted=formatted, stats=stats)
        return self.mixture(h, "answer").mean()

    def __repr__(self) -> str:
        return (
            f"SSDScorer(model={self.model_id!r}, layer={self.layer}, "
            f"heads={ {k: v.dim_ for k, v in self.heads.items()} }, "
            f"fingerprint={self.fingerprint!r})"
        )
