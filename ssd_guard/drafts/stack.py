"""The decoder pass over the segments: one Llama layer at a time, optionally with low-rank
weight perturbations (:func:`run_stack`), and the states the heads read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssd_guard.drafts.segments import (
    Segments,
    TargetParts,
    _masks,
    _positions,
    _Seg,
    flat_logit_index,
)


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
