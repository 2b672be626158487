"""Turning text into the student's inputs and targets.

* :class:`PromptEncoder` — the hidden state of a prompt's last token at layer ``l`` of a
  Hugging Face causal LM, batched with left padding. The forward pass stops at layer
  ``l`` (a hook raises once the layer has run), so the layers above it cost nothing.
  :meth:`PromptEncoder.capture` instead records that state during a generation's own
  prefill, so pre-generation scoring needs no extra pass at all.
* :class:`AnswerEmbedder` and :class:`PCAProjection` (defined in :mod:`ssd_guard.embedding`)
  and the text checks :func:`check_text` / :func:`check_texts` / :func:`check_text_lists`
  (defined in :mod:`ssd_guard.texts`) are re-exported here.

A prompt longer than the encoder's ``max_tokens`` keeps its *last* ``max_tokens`` tokens
(the end of the question, which the student reads). Only a bounded window of characters
at the end of a long text is tokenized (:meth:`PromptEncoder.bounded_text`), so a
200,000-character prompt costs what a prompt at the limit costs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any, cast

import torch
from torch import nn

from ssd_guard.embedding import AnswerEmbedder, PCAProjection
from ssd_guard.features import FeatureSpec
from ssd_guard.generation import left_pad_positions, pool_weights
from ssd_guard.texts import check_text, check_text_lists, check_texts

log = logging.getLogger("ssd_guard.encoding")

__all__ = [
    "AnswerEmbedder",
    "HiddenStateCapture",
    "PCAProjection",
    "PromptEncoder",
    "check_text",
    "check_text_lists",
    "check_texts",
    "decoder_layers",
    "prefix_length",
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
    """Ends a truncated prefill once every layer it needs has run (never leaves the call)."""


def _first(output: Any) -> torch.Tensor:
    first: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return first


class _Collect:
    """One encoding call's hook state. Hooks act only when the current context (thread
    or task) holds this object, so a hook is never visible to another caller's pass."""

    def __init__(self, spec: FeatureSpec, keep: torch.Tensor | None, stop: bool) -> None:
        self.spec = spec
        self.keep = keep  # [B, T, 1] float weights of the question tokens, or None
        self.stop = stop
        self.last: dict[int, torch.Tensor] = {}
        self.pooled: dict[int, torch.Tensor] = {}
        self.done = False

    def record(self, layer: int, h: torch.Tensor) -> None:
        if self.done:
            return
        if layer in self.spec.layers and layer not in self.last:
            self.last[layer] = h[:, -1, :].detach().float()
        if layer in self.spec.pooled_layers and layer not in self.pooled:
            keep = self.keep
            if keep is None or keep.shape[1] != h.shape[1]:
                keep = pool_weights(
                    torch.ones(h.shape[:2], dtype=torch.long, device=h.device),
                    self.spec.pool_start,
                )
            self.pooled[layer] = (h.detach().float() * keep).sum(1) / keep.sum(1)
        if len(self.last) == len(set(self.spec.layers)) and len(self.pooled) == len(
            set(self.spec.pooled_layers)
        ):
            self.done = True
            if self.stop:
                raise _StopForward

    def features(self) -> torch.Tensor:
        parts = [self.last[ly] for ly in self.spec.layers]
        parts += [self.pooled[ly] for ly in self.spec.pooled_layers]
        return torch.cat(parts, dim=-1)


_ACTIVE_CALL: ContextVar[_Collect | None] = ContextVar("ssd_guard_encoding_call", default=None)


class PromptEncoder:
    """The student's input features of a prompt (see :class:`~ssd_guard.features.FeatureSpec`):
    last-token hidden states at some layers and question-mean-pooled states at others
    (``output_hidden_states`` numbering: 0 is the embedding output, ``l`` the output of the
    ``l``-th decoder block, the last one normed).

    Args:
        model: a Hugging Face causal LM (eval mode).
        tokenizer: its tokenizer (forced to left padding).
        layer: a single last-token layer (the original SSD input); or give ``features``.
        features: the full feature spec.
        batch_size: prompts per forward pass.
        truncate: stop the forward pass after the deepest layer needed (default);
            ``False`` runs the full model with ``output_hidden_states`` (the reference
            path, for tests).
        max_tokens: prompts longer than this keep their *last* ``max_tokens`` tokens
            (default: the model's context length). Truncation is never silent: it is
            counted in :attr:`truncated` and logged. Only a bounded character window at
            the end of a long prompt is tokenized (:meth:`bounded_text`).
    """

    #: A long text is first cut to its last ``CHARS_PER_TOKEN * max_tokens`` characters
    #: (a token of natural text is about 4 characters), widened until it holds more than
    #: ``max_tokens + WINDOW_MARGIN`` tokens: the tokens lost at the cut fall outside the
    #: kept ones.
    CHARS_PER_TOKEN = 8
    WINDOW_MARGIN = 16

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        layer: int | None = None,
        *,
        features: FeatureSpec | None = None,
        batch_size: int = 16,
        truncate: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        if features is None:
            if layer is None:
                raise ValueError("give a layer or a feature spec")
            features = FeatureSpec.single(layer)
        self.model = model
        self.tokenizer = tokenizer
        self.layers = decoder_layers(model)
        n = len(self.layers)
        bad = [ly for ly in features.all_layers if not 0 <= ly <= n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range for a model with {n} layers (0..{n})")
        self.features = features
        self.layer = features.deepest
        self.num_layers = n
        self.batch_size = batch_size
        self.truncate = truncate
        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.hidden_size = int(cfg.hidden_size)
        ctx = getattr(cfg, "max_position_embeddings", None)
        self.max_tokens = int(max_tokens or ctx or 2048)
        #: the base model's context: the most a generation prompt may hold (the scoring
        #: limit ``max_tokens`` is usually far smaller: what the student was trained on)
        self.context_tokens = int(ctx or max(self.max_tokens, 2048))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        #: how many prompts were cut to their last ``max_tokens`` tokens so far
        self.truncated = 0
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        dev: torch.device = next(self.model.parameters()).device
        return dev

    @property
    def out_dim(self) -> int:
        return self.features.in_dim(self.hidden_size)

    def _module_for(self, layer: int) -> nn.Module:
        if layer == 0:
            return cast(nn.Module, self.model.get_input_embeddings())
        if layer < self.num_layers:
            return self.layers[layer - 1]
        # The last entry of hidden_states has the final norm applied: hook the norm.
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        module = getattr(decoder, "norm", None)
        if module is None:
            raise ValueError("cannot read the last layer of this model")
        return cast(nn.Module, module)

    def capture_module(self) -> nn.Module:
        """The module whose forward output is the deepest layer read."""
        return self._module_for(self.layer)

    def bounded_text(self, text: str, max_tokens: int | None = None) -> str:
        """*text*, or the shortest tried suffix of it that still holds more than
        ``max_tokens`` tokens (plus a margin): its last ``max_tokens`` tokens are the
        text's, and tokenizing it costs what the limit costs, whatever the text's length.
        The character count decides first: a text shorter than the window is returned
        as is, untokenized. *max_tokens* defaults to the encoder's."""
        limit = (max_tokens or self.max_tokens) + self.WINDOW_MARGIN
        window = max(self.CHARS_PER_TOKEN * limit, 256)
        while len(text) > window:
            tail = text[-window:]
            ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                return tail
            window *= 4
        return text

    def too_long(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text has more than ``max_tokens`` tokens (counted on its
        :meth:`bounded_text`, so a very long text costs no more than one at the limit)."""
        if not texts:
            return []
        ids = self.tokenizer([self.bounded_text(t) for t in texts])["input_ids"]
        return [len(row) > self.max_tokens for row in ids]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded ids and attention mask of *texts*, each cut to its last
        ``max_tokens`` tokens (see :meth:`tokenize_checked`)."""
        return self.tokenize_checked(texts)[0]

    def tokenize_checked(
        self, texts: Sequence[str], max_tokens: int | None = None
    ) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """:meth:`tokenize`, plus whether each text was cut to its last ``max_tokens``
        tokens (counted in :attr:`truncated` and logged). *max_tokens* defaults to the
        encoder's scoring limit; a generation prompt passes :attr:`context_tokens`."""
        limit = int(max_tokens or self.max_tokens)
        enc = self.tokenizer(
            [self.bounded_text(t, limit) for t in texts], return_tensors="pt", padding=True
        )
        ids, attn = enc["input_ids"], enc["attention_mask"]
        cut = [False] * int(ids.shape[0])
        if ids.shape[1] > limit:
            rows = (attn.sum(1) > limit).tolist()
            cut = [bool(r) for r in rows]
            long_rows = sum(cut)
            self.truncated += long_rows
            log.warning(
                "ssd_guard: %d prompt(s) longer than %d tokens were cut to their last %d "
                "tokens before scoring",
                long_rows,
                limit,
                limit,
            )
            ids, attn = ids[:, -limit:], attn[:, -limit:]
        return {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device)}, cut

    @contextlib.contextmanager
    def _hooks(self, state: _Collect) -> Iterator[None]:
        handles = []
        for ly in self.features.all_layers:

            def hook(_m: nn.Module, _inp: Any, output: Any, ly: int = ly) -> None:
                if _ACTIVE_CALL.get() is state:
                    state.record(ly, _first(output))

            handles.append(self._module_for(ly).register_forward_hook(hook))
        token = _ACTIVE_CALL.set(state)
        try:
            yield
        finally:
            _ACTIVE_CALL.reset(token)
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` float32 features for a left-padded batch of token ids."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": left_pad_positions(attention_mask),
            "use_cache": False,
        }
        spec = self.features
        if not self.truncate:
            out = self.model(**kwargs, output_hidden_states=True)
            hs = out.hidden_states
            keep = pool_weights(attention_mask, spec.pool_start)
            parts = [hs[ly][:, -1, :].float() for ly in spec.layers]
            parts += [(hs[ly].float() * keep).sum(1) / keep.sum(1) for ly in spec.pooled_layers]
            return torch.cat(parts, dim=-1)
        state = _Collect(spec, pool_weights(attention_mask, spec.pool_start), stop=True)
        with self._hooks(state), contextlib.suppress(_StopForward):
            self.model(**kwargs)
        if not state.done:
            raise RuntimeError("the forward pass finished without reaching every layer read")
        return state.features()

    def encode(self, texts: Sequence[str], *, cut: list[bool] | None = None) -> torch.Tensor:
        """``[N, F]`` float32 features, on the model's device, batched. *cut*, when given,
        receives one flag per text: whether it was cut to its last ``max_tokens`` tokens."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        outs = []
        for i in range(0, len(texts), self.batch_size):
            enc, flags = self.tokenize_checked(texts[i : i + self.batch_size])
            if cut is not None:
                cut.extend(flags)
            outs.append(self.encode_ids(enc["input_ids"], enc["attention_mask"]))
        if not outs:
            return torch.empty(0, self.out_dim, device=self.device)
        return torch.cat(outs)

    @contextlib.contextmanager
    def capture(self, attention_mask: torch.Tensor | None = None) -> Iterator[HiddenStateCapture]:
        """Record the features during the model's *own* forward passes, in this context
        only (other threads' passes through the same model are ignored).

        Use around ``model.generate(...)`` or a prefill: the first call (the prefill)
        yields the prompt representation for free, with no extra forward pass::

            with encoder.capture(enc["attention_mask"]) as cap:
                out = model.generate(**enc)
            h = cap.hidden  # [B, F]
        """
        cap = HiddenStateCapture()
        keep = (
            pool_weights(attention_mask, self.features.pool_start)
            if attention_mask is not None
            else None
        )
        state = _Collect(self.features, keep, stop=False)
        with self._hooks(state):
            yield cap
            if state.done:
                cap.hidden = state.features()
        if state.done:
            cap.hidden = state.features()


class HiddenStateCapture:
    """Holds what :meth:`PromptEncoder.capture` recorded (``None`` until the prefill ran)."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None


def prefix_length(tokenizer: Any, few_shot: str) -> int:
    """Tokens a prompt spends on the few-shot prefix (and special tokens) before its question."""
    alone = tokenizer(few_shot, add_special_tokens=True)["input_ids"]
    joined = tokenizer(few_shot + "Question:", add_special_tokens=True)["input_ids"]
    n = 0
    while n < min(len(alone), len(joined)) and alone[n] == joined[n]:
        n += 1
    return n
