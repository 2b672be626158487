"""Turning text into the student's inputs and targets.

* :class:`PromptEncoder` — the hidden state of a prompt's last token at layer ``l`` of a
  Hugging Face causal LM, batched with left padding. The forward pass stops at layer
  ``l`` (a hook raises once the layer has run), so the layers above it cost nothing.
  :meth:`PromptEncoder.capture` instead records that state during a generation's own
  prefill, so pre-generation scoring needs no extra pass at all.
* :class:`AnswerEmbedder` — sentence embeddings (L2-normalised) projected by a fitted
  :class:`PCAProjection`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ssd_guard.generation import left_pad_positions

__all__ = [
    "AnswerEmbedder",
    "HiddenStateCapture",
    "PCAProjection",
    "PromptEncoder",
    "decoder_layers",
]


def decoder_layers(model: Any) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (Llama, Gemma, Qwen, Mistral, GPT-2, ...)."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n = int(cfg.num_hidden_layers)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj) == n:
            return obj
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class PromptEncoder:
    """Last-token hidden state at layer ``layer`` (``output_hidden_states`` numbering:
    0 is the embedding output, ``l`` the output of the ``l``-th decoder block).

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: its tokenizer (forced to left padding).
        layer: the layer to read, ``0 <= layer <= num_hidden_layers``.
        batch_size: prompts per forward pass.
        truncate: stop the forward pass at ``layer`` (default); ``False`` runs the full
            model with ``output_hidden_states`` (the reference path, for tests).
    """

    def __init__(
        self, model: Any, tokenizer: Any, layer: int, *, batch_size: int = 16, truncate: bool = True
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layers = decoder_layers(model)
        n = len(self.layers)
        if not 0 <= layer <= n:
            raise ValueError(f"layer {layer} is out of range for a model with {n} layers (0..{n})")
        self.layer = layer
        self.num_layers = n
        self.batch_size = batch_size
        self.truncate = truncate
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _hook_module(self) -> nn.Module | None:
        if self.layer == 0:
            return self.model.get_input_embeddings()
        if self.layer == self.num_layers:
            return None  # the last entry of hidden_states has the final norm applied
        return self.layers[self.layer - 1]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {
            k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
        }

    @torch.inference_mode()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, H]`` float32 hidden states for a left-padded batch of token ids."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": left_pad_positions(attention_mask),
            "use_cache": False,
        }
        module = self._hook_module() if self.truncate else None
        if module is None:
            out = self.model(**kwargs, output_hidden_states=True)
            return out.hidden_states[self.layer][:, -1, :].float()

        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            raise _StopForward(_first(output))

        handle = module.register_forward_hook(hook)
        try:
            self.model(**kwargs)
        except _StopForward as stop:
            return stop.hidden[:, -1, :].float()
        finally:
            handle.remove()
        raise RuntimeError("the forward pass finished without reaching the hooked layer")

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, H]`` float32 hidden states, on the model's device, batched."""
        outs = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenize(texts[i : i + self.batch_size])
            outs.append(self.encode_ids(enc["input_ids"], enc["attention_mask"]))
        if not outs:
            return torch.empty(0, self.model.config.hidden_size, device=self.device)
        return torch.cat(outs)

    def capture_module(self) -> nn.Module:
        """The module whose forward output is the layer-``l`` hidden state."""
        module = self._hook_module()
        if module is None:
            # The final layer's state has the final norm applied: capture the norm output.
            decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
            module = getattr(decoder, "norm", None)
            if module is None:
                raise ValueError("cannot capture the last layer of this model")
        return module

    @contextlib.contextmanager
    def capture(self) -> Iterator[HiddenStateCapture]:
        """Record the layer-``l`` last-token state during the model's *own* forward passes.

        Use around ``model.generate(...)``: the first call (the prefill) yields the
        prompt representation for free, with no extra forward pass::

            with encoder.capture() as cap:
                out = model.generate(**enc)
            h = cap.hidden  # [B, H]
        """
        cap = HiddenStateCapture()
        module = self.capture_module()

        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            if cap.hidden is None:
                cap.hidden = _first(output)[:, -1, :].detach().float()

        handle = module.register_forward_hook(hook)
        try:
            yield cap
        finally:
            handle.remove()


class HiddenStateCapture:
    """Holds what :meth:`PromptEncoder.capture` recorded (``None`` until the prefill ran)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None


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
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()

    def embed(self, texts: Sequence[str], dim: int | None = None) -> torch.Tensor:
        """``[N, d]`` PCA-projected embeddings (``dim`` truncates the projection)."""
        if self.pca is None:
            raise RuntimeError("this AnswerEmbedder has no PCA projection; fit one first")
        pca = self.pca if dim is None else self.pca.truncate(dim)
        return pca.transform(self.embed_raw(texts))
