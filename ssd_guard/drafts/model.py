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

from ssd_guard.errors import ConfigError

__all__ = [
    "LINEAR_NAMES",
    "Draft",
    "HeadDelta",
    "Segments",
    "TargetParts",
    "flat_logit_index",
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
def _linear(x: torch.Tensor, mod: Any, delta: torch.Tensor | None) -> torch.Tensor:
    w = mod.weight if delta is None else mod.weight + delta
    return F.linear(x, w, mod.bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, T, d]; cos/sin [B, T, d]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * c) + (_rotate_half(x) * s)


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


def _layer(
    layer: Any,
    parts: TargetParts,
    segs: list[_Seg | None],
    masks: tuple[torch.Tensor, torch.Tensor],
    a_group: torch.Tensor,
    delta: dict[str, torch.Tensor] | None,
) -> list[_Seg | None]:
    """One Llama decoder layer over the prefix / question / answer segments."""
    attn, mlp = layer.self_attn, layer.mlp
    nh, nkv, hd = parts.num_heads, parts.num_kv_heads, parts.head_dim
    rep = nh // nkv
    d = delta or {}
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    for s in segs:
        if s is None:
            qkv.append(None)
            continue
        b, t, _ = s.h.shape
        x = layer.input_layernorm(s.h)
        q = _linear(x, attn.q_proj, d.get("self_attn.q_proj")).view(b, t, nh, hd).transpose(1, 2)
        k = _linear(x, attn.k_proj, d.get("self_attn.k_proj")).view(b, t, nkv, hd).transpose(1, 2)
        v = _linear(x, attn.v_proj, d.get("self_attn.v_proj")).view(b, t, nkv, hd).transpose(1, 2)
        q, k = _rope(q, s.cos, s.sin), _rope(k, s.cos, s.sin)
        qkv.append((q, k, v))
    sp, sq, sa = qkv
    assert sq is not None and sa is not None
    scale = float(getattr(attn, "scaling", hd**-0.5))
    outs: list[torch.Tensor | None] = []
    # prefix: plain causal self-attention (batch 1)
    if sp is not None:
        outs.append(
            F.scaled_dot_product_attention(
                sp[0],
                sp[1].repeat_interleave(rep, 1),
                sp[2].repeat_interleave(rep, 1),
                is_causal=True,
                scale=scale,
            )
        )
    else:
        outs.append(None)
    g, r = sq[0].shape[0], sa[0].shape[0]

    def keys(parts_: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts_, dim=2).repeat_interleave(rep, 1)

    pk = [sp[1].expand(g, -1, -1, -1)] if sp is not None else []
    pv = [sp[2].expand(g, -1, -1, -1)] if sp is not None else []
    outs.append(
        F.scaled_dot_product_attention(
            sq[0], keys([*pk, sq[1]]), keys([*pv, sq[2]]), attn_mask=masks[0], scale=scale
        )
    )
    pk = [sp[1].expand(r, -1, -1, -1)] if sp is not None else []
    pv = [sp[2].expand(r, -1, -1, -1)] if sp is not None else []
    outs.append(
        F.scaled_dot_product_attention(
            sa[0],
            keys([*pk, sq[1][a_group], sa[1]]),
            keys([*pv, sq[2][a_group], sa[2]]),
            attn_mask=masks[1],
            scale=scale,
        )
    )
    new: list[_Seg | None] = []
    for s, o in zip(segs, outs):
        if s is None or o is None:
            new.append(None)
            continue
        b, t, _ = s.h.shape
        o2 = _linear(
            o.transpose(1, 2).reshape(b, t, nh * hd), attn.o_proj, d.get("self_attn.o_proj")
        )
        h = s.h + o2
        x = layer.post_attention_layernorm(h)
        gate = _linear(x, mlp.gate_proj, d.get("mlp.gate_proj"))
        up = _linear(x, mlp.up_proj, d.get("mlp.up_proj"))
        h = h + _linear(mlp.act_fn(gate) * up, mlp.down_proj, d.get("mlp.down_proj"))
        new.append(_Seg(h, s.cos, s.sin))
    return new


def embed_segments(
    parts: TargetParts, seg: Segments
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Input embeddings of the prefix (``None`` when empty), questions and answers."""
    hp = parts.embed(seg.prefix.unsqueeze(0)) if seg.n_prefix else None
    return hp, parts.embed(seg.q_ids), parts.embed(seg.a_ids)


def run_stack(
    parts: TargetParts,
    layers: Sequence[nn.Module],
    seg: Segments,
    hidden: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor],
    deltas: Sequence[dict[str, torch.Tensor] | None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Run ``layers`` over the segments, from the hidden states that enter the first of
    them (``(prefix [1, P, H] or None, questions [G, Q, H], answers [R, A, H])``).
    ``deltas[i]`` perturbs layer ``i``'s linear maps (see :data:`LINEAR_NAMES`)."""
    pos_p, pos_q, pos_a = _positions(seg)
    masks = _masks(seg)
    segs: list[_Seg | None] = []
    for h, pos in zip(hidden, (pos_p, pos_q, pos_a)):
        if h is None:
            segs.append(None)
            continue
        cos, sin = parts.rotary(h, pos)
        segs.append(_Seg(h, cos.to(h.dtype), sin.to(h.dtype)))
    for i, layer in enumerate(layers):
        segs = _layer(layer, parts, segs, masks, seg.a_group, deltas[i] if deltas else None)
    out = [s.h if s is not None else None for s in segs]
    assert out[1] is not None and out[2] is not None
    return out[0], out[1], out[2]


def gather_logit_states(seg: Segments, hq: torch.Tensor, ha: torch.Tensor) -> torch.Tensor:
    """``[G + N_a, H]``: the states whose next-token distributions predict the answer
    tokens (see :func:`flat_logit_index`)."""
    rows, cols, _ = flat_logit_index(seg)
    g = torch.arange(hq.shape[0], device=hq.device)
    last_q = hq[g, seg.q_len - 1]
    return torch.cat([last_q, ha[rows.to(ha.device), cols.to(ha.device)]], dim=0)


def question_states(seg: Segments, hq: torch.Tensor) -> torch.Tensor:
    """``[Σ (q_len - 1), H]``: states predicting the questions' own tokens 2..n."""
    cols = torch.arange(hq.shape[1], device=hq.device).unsqueeze(0)
    keep = cols < (seg.q_len - 1).unsqueeze(1)
    return hq[keep]


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
