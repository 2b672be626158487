"""The generation's own token statistics: free when the guard drives the generation.

For an answer ``a_1 .. a_T`` generated after a prompt, the three statistics are

* ``tok_lp_mean``: mean over answer tokens of ``log p(a_t | prompt, a_<t)``,
* ``tok_lp_min``: the minimum of those log-probabilities,
* ``tok_entropy_mean``: mean over answer tokens of the entropy (nats) of the next-token
  distribution the token was drawn from.

A :class:`~ssd_guard.local.GuardedLocalModel` accumulates them inside its decode loop (on
the device, no host round-trip per step) and hands them to the guard through the call's
:class:`~ssd_guard.scoring.callstats.CallStats`; :func:`teacher_forced_token_stats`
recomputes them for stored (prompt, answer) pairs with one forward pass per batch (what
the training of the combined ``risk`` signal and the evaluation use). With greedy decoding
the two agree up to the tokenisation of the answer text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "TOKEN_STAT_NAMES",
    "TokenStatsAccumulator",
    "answer_token_ids",
    "step_logprob_entropy",
    "teacher_forced_token_stats",
]

#: The statistics, in the order of every array this module returns.
TOKEN_STAT_NAMES: tuple[str, ...] = ("tok_lp_mean", "tok_lp_min", "tok_entropy_mean")

#: The CallStats statistic under which a guarded generation records its answers' values.
CALLSTATS_KEY = "answer_token_stats"


def step_logprob_entropy(
    logits: torch.Tensor, chosen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(chosen), entropy)`` per row of ``logits [R, V]`` (float32, on device)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


class TokenStatsAccumulator:
    """Running sums of the statistics over the decode steps of ``R`` rows (on device).

    :meth:`update` takes a step's logits, the tokens chosen and which rows are still
    generating answer tokens (a row's stop token and the padding after it are excluded);
    :meth:`result` gives ``[R, 3]`` (NaN for a row with no answer token).
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.lp_sum = torch.zeros(rows, device=device)
        self.lp_min = torch.full((rows,), float("inf"), device=device)
        self.ent_sum = torch.zeros(rows, device=device)
        self.count = torch.zeros(rows, device=device)

    def update(self, logits: torch.Tensor, chosen: torch.Tensor, active: torch.Tensor) -> None:
        lp, ent = step_logprob_entropy(logits, chosen)
        w = active.float()
        self.lp_sum += lp * w
        self.ent_sum += ent * w
        self.lp_min = torch.where(active, torch.minimum(self.lp_min, lp), self.lp_min)
        self.count += w

    def result(self) -> torch.Tensor:
        n = self.count.clamp_min(1.0)
        out = torch.stack([self.lp_sum / n, self.lp_min, self.ent_sum / n], dim=-1)
        return torch.where((self.count > 0).unsqueeze(-1), out, torch.full_like(out, float("nan")))


def answer_token_ids(tokenizer: Any, answer: str, max_tokens: int | None = None) -> list[int]:
    """The token ids of an answer as the model generated it after ``"Answer:"`` (its first
    token carries the leading space), at most *max_tokens*; ``[]`` for an empty answer.
    Every scorer that concatenates prompt and answer ids tokenises answers this way."""
    if not answer.strip():
        return []
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids][:max_tokens]


@torch.inference_mode()
def teacher_forced_token_stats(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    max_answer_tokens: int = 32,
) -> np.ndarray:
    """The statistics ``[N, 3]`` (columns :data:`TOKEN_STAT_NAMES`) of each answer after
    its prompt (the exact text the model sees), by teacher forcing; NaN for an empty
    answer. Prompt and answer are tokenised apart and concatenated, so the boundary is
    exact; batches are right-padded (positions follow the tokens)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = next(model.parameters()).device
    out = np.full((len(prompts), 3), np.nan)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    for start in range(0, len(prompts), batch_size):
        rows = []
        for p, a in zip(
            prompts[start : start + batch_size], answers[start : start + batch_size], strict=True
        ):
            p_ids = [int(i) for i in tokenizer(p)["input_ids"]]
            a_ids = answer_token_ids(tokenizer, a, max_answer_tokens)
            rows.append((p_ids, a_ids))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (p_ids, a_ids) in enumerate(rows):
            seq = p_ids + a_ids
            ids[r, : len(seq)] = torch.tensor(seq)
            attn[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        for r, (p_ids, a_ids) in enumerate(rows):
            if not a_ids:
                continue
            lo = len(p_ids) - 1
            lg = logits[r, lo : lo + len(a_ids)]
            chosen = torch.tensor(a_ids, device=lg.device)
            lp, ent = step_logprob_entropy(lg, chosen)
            out[start + r] = [float(lp.mean()), float(lp.min()), float(ent.mean())]
    return out
