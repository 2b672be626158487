"""Answer embeddings: sentence embeddings (L2-normalised) and their fitted PCA projection
(:class:`AnswerEmbedder`, :class:`PCAProjection`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["AnswerEmbedder", "PCAProjection", "encode_normalised"]


def encode_normalised(model: Any, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """``[N, E]`` float32 L2-normalised embeddings of *texts* by a sentence-transformers
    *model*, on its device."""
    with torch.no_grad():
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    return torch.as_tensor(emb).float()


class PCAProjection:
    """``z = (e - mean) @ components.T / scale``: PCA, optionally whitened.

    ``components`` are sorted by explained variance, so the first ``d`` rows of a
    ``D``-dim projection are the ``d``-dim projection.
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor) -> None:
        if (
            components.dim() != 2
            or mean.shape[0] != components.shape[1]
            or scale.shape[0] != components.shape[0]
        ):
            raise ValueError("PCA shapes: mean [E], components [D, E], scale [D]")
        self.mean = mean.float()
        self.components = components.float()
        self.scale = scale.float()

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, X: torch.Tensor, dim: int, whiten: bool = True) -> PCAProjection:
        X = X.double()
        if dim > min(X.shape):
            raise ValueError(f"PCA dim {dim} exceeds min(n_samples, n_features) = {min(X.shape)}")
        mean = X.mean(0)
        _, s, vh = torch.linalg.svd(X - mean, full_matrices=False)
        comps = vh[:dim]
        # Deterministic signs: the largest-magnitude loading of each component is positive.
        signs = torch.sign(comps[torch.arange(dim), comps.abs().argmax(1)])
        comps = comps * signs.unsqueeze(1)
        std = s[:dim] / max(X.shape[0] - 1, 1) ** 0.5
        scale = std.clamp_min(1e-8) if whiten else torch.ones(dim, dtype=X.dtype)
        return cls(mean.float(), comps.float(), scale.float())

    def truncate(self, dim: int) -> PCAProjection:
        if dim > self.dim:
            raise ValueError(f"cannot truncate a {self.dim}-dim PCA to {dim} dims")
        return PCAProjection(self.mean, self.components[:dim], self.scale[:dim])

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        dev = X.device
        return ((X.float() - self.mean.to(dev)) @ self.components.to(dev).T) / self.scale.to(dev)

    def tensors(self, prefix: str = "pca.") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}components": self.components,
            f"{prefix}scale": self.scale,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "pca.") -> PCAProjection:
        return cls(
            tensors[f"{prefix}mean"], tensors[f"{prefix}components"], tensors[f"{prefix}scale"]
        )


class AnswerEmbedder:
    """Sentence embeddings (L2-normalised) and their PCA projection, batched."""

    def __init__(
        self, model: Any, pca: PCAProjection | None = None, *, batch_size: int = 256
    ) -> None:
        self.model = model
        self.pca = pca
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        get = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(get())

    def _direct_parts(self) -> tuple[Any, Any, int] | None:
        """``(tokenizer, transformer, max_len)`` when the model is the plain
        Transformer -> mean Pooling -> Normalize stack (MiniLM, mpnet): then a short batch
        is embedded by calling the transformer directly, skipping ``encode``'s
        per-call overhead (about 2 ms of an 8 ms one-answer embedding on CPU)."""
        if getattr(self, "_direct_model", None) is not self.model:  # (re)derive per model
            parts = None
            try:
                mods = list(self.model)
                names = [type(m).__name__ for m in mods]
                pooling = getattr(mods[1], "pooling_mode", None) if len(mods) > 1 else None
                if (
                    names == ["Transformer", "Pooling", "Normalize"]
                    and pooling in ("mean", "mean_tokens")
                    and getattr(mods[0], "auto_model", None) is not None
                    and getattr(self.model, "tokenizer", None) is not None
                ):
                    parts = (self.model.tokenizer, mods[0].auto_model, self.model.max_seq_length)
            except TypeError:  # not a sentence-transformers module list
                parts = None
            self._direct: tuple[Any, Any, int] | None = parts
            self._direct_model = self.model
        return self._direct

    @torch.inference_mode()
    def _embed_direct(self, parts: tuple[Any, Any, int], texts: Sequence[str]) -> torch.Tensor:
        tokenizer, transformer, max_len = parts
        device = next(transformer.parameters()).device
        enc = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        tokens = transformer(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=-1).cpu()

    def embed_raw(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, E]`` float32 normalised embeddings (CPU)."""
        if len(texts) == 0:
            return torch.empty(0, self.dim)
        parts = self._direct_parts() if len(texts) <= 8 else None
        if parts is not None:
            return self._embed_direct(parts, texts)
        return encode_normalised(self.model, texts, self.batch_size).cpu()

    def embed(self, texts: Sequence[str], dim: int | None = None) -> torch.Tensor:
        """``[N, d]`` PCA-projected embeddings (``dim`` truncates the projection)."""
        if self.pca is None:
            raise RuntimeError("this AnswerEmbedder has no PCA projection; fit one first")
        pca = self.pca if dim is None else self.pca.truncate(dim)
        return pca.transform(self.embed_raw(texts))
