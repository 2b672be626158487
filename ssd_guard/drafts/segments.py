"""The target's parts a draft reuses (:class:`TargetParts`) and the three-segment batch
layout (few-shot prefix, questions, answers) with its positions and attention masks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssd_guard.errors import ConfigError


# --------------------------------------------------------------------------- the target
class TargetParts:
    """The pieces of a Llama-family causal LM a draft or a tail pass needs (references)."""

    def __init__(self, model: Any) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
            raise ConfigError(
                f"draft models need a Llama-family causal LM; got {type(model).__name__}"
            )
        cfg = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        if getattr(cfg, "sliding_window", None) and cfg.model_type != "llama":
            raise ConfigError(
                f"draft models do not support sliding-window attention ({cfg.model_type})"
            )
        first = layers[0]
        if not (hasattr(first, "self_attn") and hasattr(first.self_attn, "q_proj")):
            raise ConfigError(f"unsupported decoder layer {type(first).__name__}")
        self.model = model
        self.config = cfg
        self.embed: nn.Embedding = inner.embed_tokens
        self.layers: nn.ModuleList = layers
        self.norm: nn.Module = inner.norm
        self.rotary: nn.Module = inner.rotary_emb
        self.head: torch.Tensor = model.get_output_embeddings().weight
        self.num_layers = len(layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        )
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.vocab_size = int(self.head.shape[0])

    @property
    def device(self) -> torch.device:
        return self.head.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.dtype


# --------------------------------------------------------------------------- batches
@dataclass
class Segments:
    """A batch of ``prefix + question + answer`` rows.

    ``prefix`` ``[P]`` token ids shared by every row (may be empty); ``q_ids [G, Q]``
    right-padded questions with lengths ``q_len [G]`` (each >= 1); ``a_ids [R, A]``
    right-padded answers with lengths ``a_len [R]`` (each >= 1) and ``a_group [R]``, the
    question each answer follows.
    """

    prefix: torch.Tensor
    q_ids: torch.Tensor
    q_len: torch.Tensor
    a_ids: torch.Tensor
    a_len: torch.Tensor
    a_group: torch.Tensor

    @classmethod
    def build(
        cls,
        prefix: Sequence[int],
        questions: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        groups: Sequence[int],
        pad: int = 0,
    ) -> Segments:
        if not questions or any(len(q) == 0 for q in questions):
            raise ValueError("every question needs at least one token")
        if not answers or any(len(a) == 0 for a in answers):
            raise ValueError("every answer needs at least one token")
        q = torch.full((len(questions), max(len(x) for x in questions)), pad, dtype=torch.long)
        for i, x in enumerate(questions):
            q[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        a = torch.full((len(answers), max(len(x) for x in answers)), pad, dtype=torch.long)
        for i, x in enumerate(answers):
            a[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        return cls(
            prefix=torch.tensor(list(prefix), dtype=torch.long),
            q_ids=q,
            q_len=torch.tensor([len(x) for x in questions], dtype=torch.long),
            a_ids=a,
            a_len=torch.tensor([len(x) for x in answers], dtype=torch.long),
            a_group=torch.tensor(list(groups), dtype=torch.long),
        )

    def to(self, device: torch.device | str) -> Segments:
        return Segments(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.prefix, self.q_ids, self.q_len, self.a_ids, self.a_len, self.a_group)

    @property
    def n_prefix(self) -> int:
        return int(self.prefix.shape[0])


def flat_logit_index(seg: Segments) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Where the next-token distributions of the answer tokens come from.

    Returns ``(a_rows, a_cols, per_row)``: the distribution predicting answer token 1 of
    row ``r`` is the one at the last question position of its group (flat index
    ``a_group[r]``, shared by every answer of that question); token ``t >= 2`` comes from
    answer position ``t - 2`` (flat index ``G + k`` with ``(a_rows[k], a_cols[k])``).
    ``per_row[r]`` lists the flat indices of row ``r``'s tokens in order.
    """
    g = int(seg.q_ids.shape[0])
    rows: list[int] = []
    cols: list[int] = []
    per_row: list[list[int]] = []
    for r, (n, grp) in enumerate(zip(seg.a_len.tolist(), seg.a_group.tolist())):
        idx = [int(grp)]
        for t in range(int(n) - 1):
            idx.append(g + len(rows))
            rows.append(r)
            cols.append(t)
        per_row.append(idx)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long), per_row


# --------------------------------------------------------------------------- forward
@dataclass
class _Seg:
    """One segment's hidden states inside :func:`run_stack`."""

    h: torch.Tensor  # [B, T, H]
    cos: torch.Tensor
    sin: torch.Tensor


def _positions(seg: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = seg.n_prefix
    dev = seg.q_ids.device
    pos_p = torch.arange(p, device=dev).unsqueeze(0)
    pos_q = (
        (p + torch.arange(seg.q_ids.shape[1], device=dev))
        .unsqueeze(0)
        .expand(seg.q_ids.shape[0], -1)
    )
    start = p + seg.q_len[seg.a_group]
    pos_a = start.unsqueeze(1) + torch.arange(seg.a_ids.shape[1], device=dev).unsqueeze(0)
    return pos_p, pos_q, pos_a


def _masks(seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention masks (True = may attend) for the question and answer queries."""
    p = seg.n_prefix
    dev = seg.q_ids.device
    nq, na = int(seg.q_ids.shape[1]), int(seg.a_ids.shape[1])
    causal_q = torch.ones(nq, nq, dtype=torch.bool, device=dev).tril()
    mq = torch.cat([torch.ones(nq, p, dtype=torch.bool, device=dev), causal_q], dim=1)
    qvalid = torch.arange(nq, device=dev).unsqueeze(0) < seg.q_len[seg.a_group].unsqueeze(1)
    causal_a = torch.ones(na, na, dtype=torch.bool, device=dev).tril()
    r = int(seg.a_ids.shape[0])
    ma = torch.cat(
        [
            torch.ones(r, na, p, dtype=torch.bool, device=dev),
            qvalid.unsqueeze(1).expand(r, na, nq),
            causal_a.unsqueeze(0).expand(r, na, na),
        ],
        dim=2,
    )
    return mq.view(1, 1, nq, p + nq), ma.unsqueeze(1)
