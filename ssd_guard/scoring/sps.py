"""Semantic Preservation Score (SPS): which prompt token's hidden state SemGrad should
differentiate against (arXiv 2605.04638; the authors' search is not released, their
positions are hard-coded per model, so this is our own implementation).

The idea: a token whose representation carries the *meaning* of the question is one that
stays put when the question is reworded but moves when the question changes. For each
training question we build paraphrases (:func:`paraphrases`: meaning-preserving rewordings
of the question text), render every paraphrase in the prompt format the scorer will see
(``format``, e.g. the few-shot ``"...Question: {q}\\nAnswer:"``) and read, at every layer,
the hidden state of each of the last ``k`` prompt tokens (``k`` in ``positions``, counted
from the end: ``k = 1`` is the last token, SemGrad's ``position = -k``). Only the question
is reworded, never the template's tail, so position ``k`` is the same template slot in
every paraphrase (rewording the tail, e.g. ``"A:"`` vs ``"Answer:"``, would compare
different tokens at the same offset).

Score of a ``(position, layer)`` (:func:`sps_from_features`): the representations are
centred (the mean over all samples removed: hidden states are anisotropic, every raw
cosine is near 1) and

    SPS = mean cosine between paraphrases of the same question
          - mean cosine between paraphrases of different questions,

in ``[-2, 2]`` (``0`` = the position carries nothing question-specific). A nearest-
neighbour retrieval accuracy (the share of samples whose most similar other sample is a
paraphrase of the same question) is reported beside it. The best position maximises the
mean SPS over ``select_layers`` (by default SemGrad's layers: the upper half, the last
excluded); ``best_layers`` are the ``len(select_layers)`` layers (out of ``1..L-1``) with
the highest SPS at that position, an SPS-driven alternative to the upper half.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ssd_guard.scoring.semgrad import default_layers

__all__ = [
    "SPSResult",
    "default_format",
    "paraphrases",
    "question_of_prompt",
    "select_position",
    "select_position_from_features",
    "sps_from_features",
]

#: Wrappers around the question (meaning-preserving, the template's tail untouched).
_WRAPPERS: tuple[str, ...] = (
    "{q}",
    "Please answer the following question. {q}",
    "Here is a trivia question: {q}",
    "I would like to know: {q}",
    "{q} Answer briefly.",
    "Can you tell me this? {q}",
)

#: Light lexical rewrites (applied to the original question when they match).
_REWRITES: tuple[tuple[str, str], ...] = (
    (r"^Which\b", "What"),
    (r"^What\b", "Which"),
    (r"^Who was\b", "Who is the person who was"),
    (r"^In which\b", "In what"),
    (r"^In what\b", "In which"),
    (r"^What is the name of\b", "Name"),
    (r"^Name\b", "What is the name of"),
    (r"^How many\b", "What number of"),
)


def default_format(question: str) -> str:
    """The zero-shot QA format ``"Question: {q}\\nAnswer:"``."""
    return f"Question: {question}\nAnswer:"


def question_of_prompt(prompt: str) -> str:
    """The question of a ``"Question: ...\\nAnswer:"`` prompt (the text itself otherwise)."""
    text = prompt.strip()
    if text.endswith("Answer:"):
        text = text[: -len("Answer:")].rstrip()
    if text.startswith("Question:"):
        text = text[len("Question:") :].strip()
    return text


def paraphrases(question: str) -> list[str]:
    """Meaning-preserving rewordings of ``question``, the original first, duplicates
    removed, deterministic: the fixed wrappers, a lexical rewrite of the opening words
    where one applies, and the question without its question mark."""
    q = " ".join(question.split())
    out = [w.format(q=q) for w in _WRAPPERS]
    for pat, rep in _REWRITES:
        new = re.sub(pat, rep, q, count=1)
        if new != q:
            out.append(new)
            break
    if q.endswith("?"):
        out.append(q[:-1].rstrip())
    seen: set[str] = set()
    uniq = []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


@dataclass
class SPSResult:
    """SPS per ``(position, layer)``: ``scores[i][j]`` (and ``retrieval[i][j]``) for
    ``positions[i]`` (``k`` tokens from the end) and ``layers[j]`` (hidden-state index,
    ``0`` = embeddings)."""

    positions: list[int]
    layers: list[int]
    scores: list[list[float]]
    retrieval: list[list[float]]
    select_layers: list[int]
    best_position: int  # SemGrad's ``position``: ``-k``
    best_k: int
    position_scores: list[float]  # mean SPS over select_layers, per position
    best_layers: list[int]
    n_questions: int = 0
    n_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups_of(group_sizes: Sequence[int]) -> np.ndarray:
    return np.repeat(np.arange(len(group_sizes)), np.asarray(group_sizes, dtype=np.int64))


def sps_from_features(
    features: np.ndarray | torch.Tensor, groups: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SPS and retrieval accuracy ``[P, L]`` from ``features [N, P, L, d]`` of ``N``
    samples whose question is ``groups[n]`` (see the module docstring)."""
    feats = np.asarray(features)
    if feats.ndim != 4:
        raise ValueError(f"features must be [N, P, L, d], got shape {feats.shape}")
    g = torch.as_tensor(np.asarray(groups), dtype=torch.long)
    n = feats.shape[0]
    if g.shape[0] != n:
        raise ValueError(f"{n} samples but {g.shape[0]} group labels")
    same = g[:, None] == g[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    within = same & ~eye
    across = ~same
    if not within.any() or not across.any():
        raise ValueError("need at least two questions with at least two paraphrases")
    has_pair = within.any(-1)
    scores, retrievals = [], []
    for i in range(feats.shape[1]):  # one position at a time: [L, N, N] in memory
        x = torch.as_tensor(feats[:, i], dtype=torch.float64).transpose(0, 1)  # [L, N, d]
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = x @ x.transpose(-1, -2)  # [L, N, N]
        w_mean = (sim * within).sum((-1, -2)) / within.sum()
        a_mean = (sim * across).sum((-1, -2)) / across.sum()
        scores.append(w_mean - a_mean)
        nearest = sim.masked_fill(eye, -torch.inf).argmax(-1)  # [L, N]
        hit = (g[nearest] == g).double()
        retrievals.append((hit * has_pair).sum(-1) / has_pair.sum())
    return torch.stack(scores).numpy(), torch.stack(retrievals).numpy()


@torch.inference_mode()
def _features(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    positions: Sequence[int],
    layers: Sequence[int],
    batch_size: int,
) -> np.ndarray:
    """Hidden states ``[N, P, L, d]`` of the last-``k`` tokens of every text."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    pad = int(pad if pad is not None else 0)
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch_size):
        enc = [
            [int(t) for t in tokenizer(s)["input_ids"]] for s in texts[start : start + batch_size]
        ]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, : len(e)] = torch.tensor(e)
            attn[r, : len(e)] = 1
        hs = model.base_model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            output_hidden_states=True,
            use_cache=False,
        ).hidden_states
        lens = torch.tensor([len(e) for e in enc], device=device)
        ar = torch.arange(len(enc), device=device)
        per_pos = []
        for k in positions:
            idx = (lens - k).clamp_min(0)
            per_pos.append(torch.stack([hs[layer][ar, idx].float() for layer in layers], dim=1))
        out.append(torch.stack(per_pos, dim=1).cpu().numpy())  # [B, P, L, d]
    return np.concatenate(out, axis=0)


def select_position(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    positions: Iterable[int] = range(1, 9),
    layers: Sequence[int] | None = None,
    select_layers: Sequence[int] | None = None,
    format: Callable[[str], str] | None = None,
    paraphrase: Callable[[str], list[str]] = paraphrases,
    batch_size: int = 8,
) -> SPSResult:
    """Score every ``(position, layer)`` on paraphrases of ``questions`` and pick SemGrad's
    position (see the module docstring). ``layers`` are scored (default: every hidden
    state, ``0..L``); the position is chosen on ``select_layers`` (default SemGrad's
    upper half); ``format`` renders a (paraphrased) question as the prompt the scorer sees
    (default :func:`default_format`)."""
    fmt = format if format is not None else default_format
    pos = [int(k) for k in positions]
    if not pos or min(pos) < 1:
        raise ValueError(f"positions count tokens from the end and start at 1, got {pos}")
    n_layers = int(_num_layers(model))
    all_layers = list(layers) if layers is not None else list(range(n_layers + 1))
    sel = list(select_layers) if select_layers is not None else default_layers(n_layers)
    missing = [x for x in sel if x not in all_layers]
    if missing:
        raise ValueError(f"select_layers {missing} are not among the scored layers")
    texts: list[str] = []
    sizes: list[int] = []
    for q in questions:
        ps = paraphrase(q)
        texts.extend(fmt(p) for p in ps)
        sizes.append(len(ps))
    feats = _features(model, tokenizer, texts, pos, all_layers, batch_size)
    return _result(feats, _groups_of(sizes), pos, all_layers, sel, n_layers, len(questions))


def _num_layers(model: Any) -> int:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


def _result(
    feats: np.ndarray,
    groups: np.ndarray,
    pos: list[int],
    all_layers: list[int],
    sel: list[int],
    n_layers: int,
    n_questions: int,
) -> SPSResult:
    score, retr = sps_from_features(feats, groups)
    cols = [all_layers.index(x) for x in sel]
    pos_scores = score[:, cols].mean(-1)
    best_i = int(np.argmax(pos_scores))
    inner = [j for j, layer in enumerate(all_layers) if 1 <= layer < n_layers] or list(
        range(len(all_layers))
    )
    ranked = sorted(inner, key=lambda j: (-score[best_i, j], all_layers[j]))
    best_layers = sorted(all_layers[j] for j in ranked[: len(sel)])
    return SPSResult(
        positions=pos,
        layers=all_layers,
        scores=score.tolist(),
        retrieval=retr.tolist(),
        select_layers=sel,
        best_position=-pos[best_i],
        best_k=pos[best_i],
        position_scores=pos_scores.tolist(),
        best_layers=best_layers,
        n_questions=n_questions,
        n_samples=int(feats.shape[0]),
    )


def select_position_from_features(
    features: np.ndarray,
    group_sizes: Sequence[int],
    *,
    positions: Sequence[int],
    layers: Sequence[int],
    select_layers: Sequence[int],
    num_layers: int,
) -> SPSResult:
    """:func:`select_position` on precomputed ``features [N, P, L, d]`` (tests, caches)."""
    return _result(
        np.asarray(features),
        _groups_of(group_sizes),
        list(positions),
        list(layers),
        list(select_layers),
        int(num_layers),
        len(group_sizes),
    )
