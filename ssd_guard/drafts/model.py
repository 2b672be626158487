"""Draft models built from the target, the three-segment batch layout they run on, the
low-rank weight perturbations of the target, and the divergences of the EU estimate.

**Drafts.** A draft is the target's input embedding, a few of its decoder layers
(trainable copies, float32 master weights), a copy of its final norm (trainable) and its
output head. The embedding and the head stay frozen *references* to the target's own
tensors, never copies, so a draft costs only its decoder layers in memory and in the
artifact. Only Llama-family decoder layers (SmolLM2, Llama, Mistral-style attention
without sliding windows) are supported: the forward pass below re-implements their
layer (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP) so that

**the three-segment layout** can share work: every row of a batch is
``few-shot prefix + question + answer``. The prefix is identical for every prompt (the
recipe's few-shot block), so it runs once per forward (batch 1); each question runs once
however many answers it has; each answer attends to the prefix, its own question and
its own earlier tokens. A causal LM's states on the prefix and the question do not
depend on what follows, so this is exactly the model's pass over the concatenated ids,
for a fraction of the tokens. :func:`run_stack` is that pass for any slice of layers and
is tested against the Hugging Face forward.

**Perturbations** (:func:`sample_deltas`): the Online Stochastic Distillation teacher and
the benchmark's reference ensemble are copies of the target whose last few decoder
layers (and optionally the head) get a fresh low-rank Gaussian perturbation
``dW = sigma * rms(W) * A @ B.T / sqrt(r)``, ``A ~ N(0, 1)^{out x r}``,
``B ~ N(0, 1)^{in x r}``: each entry of ``dW`` has standard deviation
``sigma * rms(W)``, so ``sigma`` is a scale relative to the weights.

**The EU estimate** (:func:`token_eu`), with drafts ``q_1..q_K``, their mixture
``q̄ = (1/K) Σ_k q_k`` and the proxy ``p̃`` of the target's Bayesian model average::

    EU(t) = JSD(q_1..q_K) + KL(q̄ || p̃)
          = (1/K) Σ_k KL(q_k || q̄)  +  Σ_v q̄(v) log(q̄(v) / p̃(v))
          = (1/K) Σ_k KL(q_k || p̃)                 (the bias-variance identity)

The variance term is the drafts' disagreement; the bias term how far their mixture sits
from the (proxy) model average. The paper's summary names the bias term "KL between the
draft mixture and the target [average]" without a direction; ``KL(q̄ || p̃)`` is the one
for which the decomposition is exact (the drafts play the posterior samples ``p_θ`` of
``MI = E_θ KL(p_θ || p̄)``, the target's epistemic uncertainty).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssd_guard.drafts.segments import (  # re-exported: the layout lives there
    Segments,
    TargetParts,
    flat_logit_index,
)
from ssd_guard.drafts.stack import (  # re-exported: the decoder pass lives there
    embed_segments,
    gather_logit_states,
    question_states,
    run_stack,
)
from ssd_guard.errors import ConfigError

__all__ = [
    "LINEAR_NAMES",
    "Draft",
    "HeadDelta",
    "Segments",
    "TargetParts",
    "embed_segments",
    "flat_logit_index",
    "gather_logit_states",
    "question_states",
    "run_stack",
    "sample_deltas",
    "token_eu",
]

#: The linear maps of a Llama decoder layer, as ``<module>.<linear>``.
LINEAR_NAMES: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class HeadDelta:
    """A low-rank perturbation of the output head: ``logits += scale * (x @ b) @ a.T``."""

    a: torch.Tensor  # [V, r]
    b: torch.Tensor  # [H, r]
    scale: float


def head_logits(
    parts: TargetParts, x: torch.Tensor, delta: HeadDelta | None = None
) -> torch.Tensor:
    """Logits of normed states ``x [N, H]`` under the target's head (``[N, V]``)."""
    w = parts.head
    out = F.linear(x.to(w.dtype) if not torch.is_autocast_enabled() else x, w)
    if delta is not None:
        out = out + ((x.to(delta.b.dtype) @ delta.b) @ delta.a.T * delta.scale).to(out.dtype)
    return out


# --------------------------------------------------------------------------- perturbations
def _rms(w: torch.Tensor) -> float:
    return float(w.detach().float().pow(2).mean().sqrt())


def sample_deltas(
    parts: TargetParts,
    layer_ids: Sequence[int],
    *,
    sigma: float,
    rank: int,
    generator: torch.Generator,
    head: bool,
) -> tuple[list[dict[str, torch.Tensor] | None], HeadDelta | None]:
    """Fresh low-rank Gaussian perturbations of the target's layers ``layer_ids`` (and
    its head): ``dW = sigma * rms(W) * A @ B.T / sqrt(rank)``. ``sigma == 0`` draws
    nothing and returns no perturbation. The factors are drawn on the CPU from
    ``generator`` (reproducible on any device) in a fixed order."""
    if sigma == 0:
        return [None] * len(layer_ids), None
    out: list[dict[str, torch.Tensor] | None] = []
    for i in layer_ids:
        layer: Any = parts.layers[i]
        d: dict[str, torch.Tensor] = {}
        for name in LINEAR_NAMES:
            lin: Any = layer.get_submodule(name)
            w: torch.Tensor = lin.weight
            a = torch.randn(w.shape[0], rank, generator=generator)
            b = torch.randn(w.shape[1], rank, generator=generator)
            dw = (a @ b.T) * (sigma * _rms(w) / math.sqrt(rank))
            d[name] = dw.to(device=w.device, dtype=w.dtype)
        out.append(d)
    hd = None
    if head:
        w = parts.head
        a = torch.randn(w.shape[0], rank, generator=generator)
        b = torch.randn(w.shape[1], rank, generator=generator)
        hd = HeadDelta(
            a.to(w.device, torch.float32),
            b.to(w.device, torch.float32),
            sigma * _rms(w) / math.sqrt(rank),
        )
    return out, hd


# --------------------------------------------------------------------------- drafts
class Draft(nn.Module):
    """A draft: copies of some target decoder layers + a copy of its final norm (the
    trained parameters), on the target's frozen embedding and head (references)."""

    def __init__(self, parts: TargetParts, layer_ids: Sequence[int]) -> None:
        super().__init__()
        bad = [i for i in layer_ids if not 0 <= i < parts.num_layers]
        if bad or not layer_ids:
            raise ConfigError(
                f"draft layers {list(layer_ids)}: need target layer indices in "
                f"[0, {parts.num_layers})"
            )
        self.source_layers = [int(i) for i in layer_ids]
        self.layers = nn.ModuleList([copy.deepcopy(parts.layers[i]).float() for i in layer_ids])
        self.norm = copy.deepcopy(parts.norm).float()
        for p in self.parameters():
            p.requires_grad_(True)
        self._parts = [parts]  # a list: keeps the target out of this module's parameters

    @property
    def parts(self) -> TargetParts:
        return self._parts[0]

    def forward_states(
        self, seg: Segments, *, with_question: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normed states at the answer-token logit positions ``[G + N_a, H]`` (and, with
        ``with_question``, at the question-token positions)."""
        parts = self.parts
        hidden = embed_segments(parts, seg)
        _, hq, ha = run_stack(parts, list(self.layers), seg, hidden)
        states = self.norm(gather_logit_states(seg, hq, ha))
        qs = self.norm(question_states(seg, hq)) if with_question else None
        return states, qs

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return head_logits(self.parts, states)

    def state_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {
            k: (v.detach().to(dtype) if dtype is not None else v.detach()).cpu().contiguous()
            for k, v in self.state_dict().items()
        }


# --------------------------------------------------------------------------- divergences
def token_eu(logq: torch.Tensor, logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token-level EU from draft log-probabilities ``logq [K, N, V]`` and the proxy's
    ``logp [N, V]`` (float32 recommended).

    Returns ``jsd`` (variance: ``(1/K) Σ_k KL(q_k || q̄)``), ``kl`` (bias:
    ``KL(q̄ || p̃)``) and ``eu = jsd + kl``, each ``[N]`` in nats.
    """
    k = logq.shape[0]
    logqbar = torch.logsumexp(logq, dim=0) - math.log(k)
    q = logq.exp()
    jsd = (q * (logq - logqbar.unsqueeze(0))).sum(-1).mean(0)
    kl = (logqbar.exp() * (logqbar - logp)).sum(-1)
    jsd, kl = jsd.clamp_min(0.0), kl.clamp_min(0.0)
    return {"jsd": jsd, "kl": kl, "eu": jsd + kl}


def forward_kl(logp_teacher: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row of ``[N, V]`` log-probabilities."""
    return (logp_teacher.exp() * (logp_teacher - logq)).sum(-1)


def mutual_information(logp: torch.Tensor) -> torch.Tensor:
    """JSD among ``M`` members ``logp [M, N, V]`` = their mutual information ``[N]``."""
    m = logp.shape[0]
    logbar = torch.logsumexp(logp, dim=0) - math.log(m)
    return (logp.exp() * (logp - logbar.unsqueeze(0))).sum(-1).mean(0).clamp_min(0.0)
