"""`SSDScorer`: prompt encoder + student + answer embedder, in one object.

One forward pass of the base model up to layer ``l`` (or none, when the hidden state
was captured during the guarded model's own prefill) gives a Gaussian mixture over
the embeddings of the answers the model would give:

* ``score_prompts`` — Rényi-2 entropy of the risk head (pre-generation risk);
* ``score_answers`` — log-likelihood of answers under the answer head (post-generation
  check, poisoned content, multiple-choice selection);
* ``consensus`` — the mixture mean (semantic consensus, PCA space).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from ssd_guard.artifact import Manifest, check_compatible, load_artifact
from ssd_guard.encoding import AnswerEmbedder, PCAProjection, PromptEncoder
from ssd_guard.errors import ArtifactError
from ssd_guard.mixture import GaussianMixture
from ssd_guard.student import SSDStudent

__all__ = ["SSDScorer", "build_heads"]

HiddenProvider = Callable[[list[str]], torch.Tensor]
_HIDDEN_PROVIDER: ContextVar[tuple[object, HiddenProvider] | None] = ContextVar(
    "ssd_guard_hidden_provider", default=None
)


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
            "in_dim": manifest.base_model.hidden_size,
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
        self.encoder = PromptEncoder(model, tokenizer, manifest.layer, batch_size=batch_size)
        self.embedder = AnswerEmbedder(embedder, PCAProjection.from_tensors(tensors))
        self.heads = build_heads(manifest, tensors, device=self.device)
        self.calibration: dict[str, list[float]] = {
            key.split(".", 1)[1]: sorted(v.tolist())
            for key, v in tensors.items()
            if key.startswith("calibration.")
        }
        self.model_id = model_id or manifest.base_model.id
        self.model_fingerprint = model_fingerprint
        self.fingerprint = manifest.fingerprint
        self.layer = manifest.layer

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
        )

    # ------------------------------------------------------------------ text helpers
    def format_prompt(self, prompt: str) -> str:
        """Few-shot prefix + template, as during distillation.

        The text may be a bare question or already in ``Question: ...\nAnswer:`` form.
        """
        text = prompt.strip()
        if text.startswith("Question:"):
            text = text[len("Question:") :].strip()
        if text.endswith("Answer:"):
            text = text[: -len("Answer:")].strip()
        fmt = self.manifest.prompt
        return fmt.few_shot + fmt.template.replace("{question}", text)

    def hidden(self, prompts: Sequence[str], *, formatted: bool = False) -> torch.Tensor:
        """``[B, H]`` prompt representations (truncated prefill up to the layer)."""
        texts = list(prompts) if formatted else [self.format_prompt(p) for p in prompts]
        active = _HIDDEN_PROVIDER.get()
        if active is not None and active[0] is self:
            return active[1](texts)
        return self.encoder.encode(texts)

    @contextlib.contextmanager
    def hidden_provider(self, provider: HiddenProvider) -> Iterator[None]:
        """Within this context (thread / task), :meth:`hidden` asks *provider* for the
        formatted prompts' ``[B, H]`` states instead of running a truncated prefill.

        :class:`ssd_guard.local.GuardedLocalModel` uses it to hand over the state it
        captured during the generation's own prefill (zero extra forward pass).
        """
        token = _HIDDEN_PROVIDER.set((self, provider))
        try:
            yield
        finally:
            _HIDDEN_PROVIDER.reset(token)

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

    def score_prompts(self, prompts: Sequence[str], *, formatted: bool = False) -> list[float]:
        """Pre-generation risk: Rényi-2 entropy per prompt (higher = riskier)."""
        if not prompts:
            return []
        return self.entropy_from_hidden(self.hidden(prompts, formatted=formatted)).cpu().tolist()  # type: ignore[no-any-return]

    def embed_answers(self, answers: Sequence[str], head: str = "answer") -> torch.Tensor:
        """Answers projected into *head*'s target space (``[N, d]``)."""
        dim = self.heads[head].dim_
        z = self.embedder.embed(answers, dim=dim)
        if not self.manifest.heads[head].whitened and self.embedder.pca is not None:
            z = z * self.embedder.pca.scale[:dim]  # plain PCA coordinates
        return z

    def score_answers(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        *,
        formatted: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> list[float] | list[list[float]]:
        """Post-generation check: log-likelihood of each answer under its prompt's mixture.

        ``answers`` holds one string per prompt (returns ``list[float]``) or a list of
        candidate strings per prompt (returns ``list[list[float]]``; lists may differ
        in length).
        """
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer entries")
        if not prompts:
            return []
        h = self.hidden(prompts, formatted=formatted) if hidden is None else hidden
        if all(isinstance(a, str) for a in answers):
            z = self.embed_answers([str(a) for a in answers])
            return self.loglik_from_hidden(h, z).cpu().tolist()  # type: ignore[no-any-return]
        lists = [[a] if isinstance(a, str) else list(a) for a in answers]
        flat = [a for lst in lists for a in lst]
        z_flat = self.embed_answers(flat)
        mix = self.mixture(h, "answer")
        out: list[list[float]] = []
        pos = 0
        for i, lst in enumerate(lists):
            n = len(lst)
            if n == 0:
                out.append([])
                continue
            lp = mix[i].log_prob(z_flat[pos : pos + n].unsqueeze(0).to(self.device))
            out.append(lp[0].cpu().tolist())
            pos += n
        return out

    def consensus(self, prompts: Sequence[str], *, formatted: bool = False) -> torch.Tensor:
        """Mixture mean ``[B, d]`` of the answer head, in PCA space."""
        return self.mixture(self.hidden(prompts, formatted=formatted), "answer").mean()

    def __repr__(self) -> str:
        return (
            f"SSDScorer(model={self.model_id!r}, layer={self.layer}, "
            f"heads={ {k: v.dim_ for k, v in self.heads.items()} }, "
            f"fingerprint={self.fingerprint!r})"
        )
