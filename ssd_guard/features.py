"""What the student reads from the base model: :class:`FeatureSpec`.

A student's input is the concatenation of

* the **last prompt token's** hidden state at each layer of ``layers``, and
* the hidden state **mean-pooled over the question's tokens** (every prompt token from
  position ``pool_start`` on, i.e. after the shared few-shot prefix) at each layer of
  ``pooled_layers``,

in that order (``output_hidden_states`` numbering: 0 = embeddings, ``L`` = the last
block's normed output). The original SSD student reads one last-token layer; several
layers and the pooled question carry more of what the teacher's answer spread depends
on (chosen on validation data, see ``benchmarks/results/ssd-levers-smollm2.json``).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FeatureSpec"]


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[int] = Field(default_factory=list)
    pooled_layers: list[int] = Field(default_factory=list)
    #: Tokens of the few-shot prefix (and special tokens) that pooling skips.
    pool_start: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _non_empty(self) -> FeatureSpec:
        if not self.layers and not self.pooled_layers:
            raise ValueError("a feature spec needs at least one layer")
        if min([*self.layers, *self.pooled_layers]) < 0:
            raise ValueError("layers must be >= 0")
        return self

    @classmethod
    def single(cls, layer: int) -> FeatureSpec:
        """The original SSD input: the last token's state at one layer."""
        return cls(layers=[layer])

    @property
    def deepest(self) -> int:
        """The deepest layer read: a truncated prefill may stop after it."""
        return max([*self.layers, *self.pooled_layers])

    @property
    def all_layers(self) -> list[int]:
        return sorted({*self.layers, *self.pooled_layers})

    def in_dim(self, hidden_size: int) -> int:
        return hidden_size * (len(self.layers) + len(self.pooled_layers))

    def assemble(self, last: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, F]`` float32 from per-layer states ``last`` / ``pooled`` ``[N, L+1, H]``
        (or dicts-by-layer turned into that shape by the caller)."""
        parts = [last[:, ly].float() for ly in self.layers]
        if self.pooled_layers:
            if pooled is None:
                raise ValueError("this feature spec reads pooled states, but none were given")
            parts += [pooled[:, ly].float() for ly in self.pooled_layers]
        return torch.cat(parts, dim=-1)

    def describe(self) -> str:
        out = []
        if self.layers:
            out.append("last token @ " + ",".join(map(str, self.layers)))
        if self.pooled_layers:
            out.append("question mean @ " + ",".join(map(str, self.pooled_layers)))
        return "; ".join(out)
