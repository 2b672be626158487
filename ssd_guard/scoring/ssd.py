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
runs (``ssd-guard artifact`` prints the manifest once they pass).

Every method that needs a prompt's hidden state takes ``stats=``, a
:class:`~ssd_guard.scoring.callstats.CallStats` of the guarded call: the state is then
computed once per call (or handed over by the call's ``hidden_provider``, e.g. from the
generation's own prefill) and reused by every later check of that call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ssd_guard.answers import answer_core, chat_prompt, core_span, normalise_answer, question_of
from ssd_guard.artifact import Manifest, bundled_artifact_path, check_compatible, load_artifact
from ssd_guard.encoding import (
    AnswerEmbedder,
    PCAProjection,
    PromptEncoder,
    check_text,
    check_text_lists,
    check_texts,
)
from ssd_guard.errors import ArtifactError, ArtifactMismatchError, GuardInputError
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.callstats import CallStats
from ssd_guard.scoring.risk import RiskModel, load_risk_model
from ssd_guard.scoring.token_stats import CALLSTATS_KEY
from ssd_guard.student import SSDStudent

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

#: Answer signals of one pass (higher = more plausible for each).
ANSWER_SIGNALS = ("loglik", "pmi", "consensus")

#: What a prompt longer than ``max_prompt_tokens`` gets: its last tokens scored (logged,
#: ``truncated`` on the audit events), or a :class:`~ssd_guard.errors.GuardInputError`.
LONG_PROMPT_POLICIES = ("truncate", "error")
LongPromptPolicy = Literal["truncate", "error"]


def load_marginal(tensors: dict[str, torch.Tensor]) -> GaussianMixture | None:
    """The unconditional answer density stored as ``marginal.{weights,means,scales}``."""
    keys = ("marginal.weights", "marginal.means", "marginal.scales")
    present = [k for k in keys if k in tensors]
    if not present:
        return None
    if len(present) != len(keys):
        missing = [k for k in keys if k not in tensors]
        raise ArtifactError(f"artifact holds an incomplete marginal density: no {missing}")
    try:
        return GaussianMixture(
            tensors["marginal.weights"].float().unsqueeze(0),
            tensors["marginal.means"].float().unsqueeze(0),
            tensors["marginal.scales"].float().unsqueeze(0),
        )
    except (RuntimeError, ValueError) as exc:
        raise ArtifactError(f"artifact's marginal density is malformed: {exc}") from exc


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
        config: dict[str, Any] = {
            "in_dim": manifest.feature_spec.in_dim(manifest.base_model.hidden_size),
            "out_dim": info.dim,
            "n_components": info.n_components,
            "hidden": info.hidden,
            "depth": info.depth,
            "min_scale": info.min_scale,
            "val_nll": info.val_nll,
        }
        try:
            heads[name] = SSDStudent.from_state(config, state, device=device)
        except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict(strict=True)
            detail = str(exc).strip().splitlines()
            raise ArtifactError(
                f"artifact head {name!r}: its tensors do not have the shapes the manifest "
                f"gives (in_dim={config['in_dim']}, dim={info.dim}, "
                f"n_components={info.n_components}, hidden={info.hidden}, "
                f"depth={info.depth}): {detail[-1] if detail else type(exc).__name__}"
            ) from exc
    return heads


def _student_parts(
    manifest: Manifest, tensors: dict[str, torch.Tensor], device: torch.device | str | None
) -> tuple[dict[str, SSDStudent], PCAProjection, GaussianMixture | None]:
    """The heads, answer PCA and marginal density of an artifact, each checked against
    the manifest (:class:`ArtifactError` with what does not match)."""
    n_layers = manifest.base_model.num_layers
    beyond = [ly for ly in manifest.feature_spec.all_layers if ly > n_layers]
    if beyond:
        raise ArtifactError(
            f"artifact reads layer {beyond[0]}, but its base model {manifest.base_model.id} "
            f"has {n_layers} layers (0..{n_layers})"
        )
    keys = ("pca.mean", "pca.components", "pca.scale")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ArtifactError(f"artifact holds no answer PCA: no {missing}")
    try:
        pca = PCAProjection.from_tensors(tensors)
    except ValueError as exc:
        raise ArtifactError(f"artifact's answer PCA is malformed: {exc}") from exc
    if pca.input_dim != manifest.embedder.dim:
        raise ArtifactError(
            f"artifact's answer PCA reads {pca.input_dim}-dim embeddings, but the manifest's "
            f"embedder {manifest.embedder.id} has dim {manifest.embedder.dim}"
        )
    for name, info in manifest.heads.items():
        if info.dim > pca.dim:
            raise ArtifactError(
                f"artifact head {name!r} has dim {info.dim}, more than the answer PCA's "
                f"{pca.dim} components"
            )
    heads = build_heads(manifest, tensors, device=device)
    return heads, pca, load_marginal(tensors)


class StudentArtifact(NamedTuple):
    """An artifact read and checked by :func:`read_student`."""

    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    risk_model: RiskModel | None


def read_student(artifact: str | Path = "bundled") -> StudentArtifact:
    """Read an artifact and run every check of :meth:`SSDScorer.load` that needs no base
    model: a valid manifest of a known format, weights matching its sha256, the PCA,
    heads (with the shapes the manifest gives) and marginal density it names, and a
    ``risk.safetensors`` fitted for this very student (fingerprint). Raises
    :class:`~ssd_guard.errors.ArtifactError` (or a subclass) with what is wrong."""
    manifest, tensors = load_artifact(artifact)
    path = bundled_artifact_path() if str(artifact) == "bundled" else Path(artifact)
    _student_parts(manifest, tensors, "cpu")
    return StudentArtifact(path, manifest, tensors, load_risk_model(path, manifest.fingerprint))


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
        max_prompt_tokens: int | None = None,
        on_long_prompt: LongPromptPolicy = "truncate",
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

        ``max_prompt_tokens`` (default: the manifest's ``prompt.max_tokens``, else
        :data:`~ssd_guard.artifact.DEFAULT_MAX_PROMPT_TOKENS`, capped at the base model's
        context) bounds the tokens of a formatted prompt that are scored; a longer prompt
        keeps its last ``max_prompt_tokens`` tokens, logged and flagged ``truncated``
        (``on_long_prompt="truncate"``), or raises
        :class:`~ssd_guard.errors.GuardInputError` (``on_long_prompt="error"``).

        Every check runs before the models load (:func:`read_student`); the same checks
        back ``ssd-guard artifact`` (:func:`verify_artifact`).
        """
        return cls._from_student(
            read_student(artifact),
            lm=lm,
            embedder=embedder,
            device=device,
            dtype=dtype,
            base_model=base_model,
            batch_size=batch_size,
            embedder_dtype=embedder_dtype,
            max_prompt_tokens=max_prompt_tokens,
            on_long_prompt=on_long_prompt,
        )

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
