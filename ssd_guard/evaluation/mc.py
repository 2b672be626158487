"""Multiple-choice selection: rank the choices of each question by log-likelihood.

The SSD student ranks choices by the log-likelihood of their embeddings under the
prompt's answer mixture (no generation, one truncated prefill). The base model's own
choice, the usual baseline, ranks them by the sequence log-probability of the choice's
tokens after the prompt (summed, and per token).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["choice_logprobs"]


@torch.inference_mode()
def choice_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    separator: str = " ",
    max_batch: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probability of each choice's tokens after its prompt.

    The context and the continuation (``separator + choice``) are tokenised separately
    and concatenated, as lm-evaluation-harness does, so the context's tokens are the
    same for every choice. Returns ``(sum, mean)``, each ``[N, C]``; questions with
    fewer choices are padded with ``-inf``.
    """
    n = len(texts)
    c_max = max((len(c) for c in choices), default=0)
    total = np.full((n, c_max), -np.inf)
    mean = np.full((n, c_max), -np.inf)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[int, int, list[int], int]] = []  # (question, choice, ids, n_ctx)
    for q, (text, opts) in enumerate(zip(texts, choices, strict=True)):
        ctx = tokenizer(text, add_special_tokens=True)["input_ids"]
        for c, opt in enumerate(opts):
            cont = tokenizer(separator + opt, add_special_tokens=False)["input_ids"]
            seqs.append((q, c, list(ctx) + list(cont), len(ctx)))
    # Batches of similar length, so padding stays small.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))
    for b in range(0, len(order), max_batch):
        batch = [seqs[i] for i in order[b : b + max_batch]]
        width = max(len(s[2]) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, _, tok, _) in enumerate(batch):  # right padding
            ids[r, : len(tok)] = torch.tensor(tok)
            attn[r, : len(tok)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        for r, (q, c, tok, n_ctx) in enumerate(batch):
            tgt = torch.tensor(tok[n_ctx:], device=device)
            lp = torch.log_softmax(logits[r, n_ctx - 1 : len(tok) - 1].float(), dim=-1)
            vals = lp.gather(1, tgt.unsqueeze(1)).squeeze(1)
            total[q, c] = float(vals.sum())
            mean[q, c] = float(vals.mean()) if vals.numel() else -np.inf
    return total, mean
