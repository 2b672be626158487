"""Batched teacher sampling with one shared prefill.

For every prompt the teacher needs one low-temperature *default* answer and ``n``
stochastic answers. ``generate(num_return_sequences=...)`` would prefill every prompt
``n + 1`` times; here the prompt batch is prefilled once, the KV cache is repeated for
the ``n + 1`` rows of each prompt, and a short decode loop runs until every row has
finished its first line. The prefill also yields the hidden states of the last prompt
token at every layer, which the distillation stores as the student's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SAMPLING_KEYS",
    "SampledAnswers",
    "decode_loop",
    "first_line",
    "left_pad_positions",
    "pool_hidden_states",
    "pool_weights",
    "prefill_states",
    "sample_answers",
    "sample_token_ids",
    "sampling_of",
    "stop_token_table",
]

#: The keywords of :func:`sample_answers` that say what is sampled: a teacher's settings.
SAMPLING_KEYS = ("n_samples", "temperature", "default_temperature", "max_new_tokens")


def sampling_of(settings: Any) -> dict[str, Any]:
    """The :data:`SAMPLING_KEYS` attributes of *settings* (a recipe's ``teacher``, a
    :class:`~ssd_guard.training.stats.LiveStats`...), as :func:`sample_answers` keywords."""
    return {k: getattr(settings, k) for k in SAMPLING_KEYS}


@dataclass
class SampledAnswers:
    """Answers for a batch of prompts.

    ``default[i]`` is prompt ``i``'s low-temperature answer, ``samples[i]`` its ``n``
    stochastic answers, and ``hidden`` (when requested) is ``[B, L+1, H]``: the
    last-token hidden state at every layer (index 0 = embeddings), as
    ``output_hidden_states`` numbers them.
    """

    default: list[str]
    samples: list[list[str]]
    hidden: torch.Tensor | None
    #: ``[B, L+1, H]``: the mean hidden state over each prompt's tokens from position
    #: ``pool_start`` on (the question, without a shared few-shot prefix); ``None``
    #: unless ``pool_start`` was given.
    pooled: torch.Tensor | None = None


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def stop_token_table(tokenizer: Any, device: torch.device) -> torch.Tensor:
    """Boolean ``[vocab]`` table: tokens that end an answer (a newline, or end of text)."""
    vocab = len(tokenizer)
    table = torch.zeros(vocab, dtype=torch.bool)
    for tok_id in range(vocab):
        piece = tokenizer.decode([tok_id])
        if "\n" in piece:
            table[tok_id] = True
    for special in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if isinstance(special, int) and 0 <= special < vocab:
            table[special] = True
    for tok in getattr(tokenizer, "all_special_ids", []):
        if 0 <= tok < vocab and tok != getattr(tokenizer, "bos_token_id", None):
            table[tok] = True
    return table.to(device)


def decode_loop(
    model: Any,
    cache: Any,
    logits: torch.Tensor,
    attn: torch.Tensor,
    next_pos: torch.Tensor,
    *,
    temps: torch.Tensor,
    greedy_rows: torch.Tensor,
    max_new_tokens: int,
    stop_table: torch.Tensor,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    token_stats: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode from a prefilled KV cache until every row has ended its first line.

    ``logits`` ``[R, V]`` are the prefill's last-position logits, ``attn`` the ``[R, T]``
    attention mask so far, ``next_pos`` ``[R, 1]`` the next position ids; rows with
    ``greedy_rows`` take the argmax, the others sample at ``temps`` ``[R, 1]``. Returns
    ``(tokens [R, max_new_tokens], lengths [R])``: a row's answer is
    ``tokens[r, :lengths[r]]`` (the stop token excluded). One host sync per step.
    *token_stats*, a :class:`~ssd_guard.scoring.token_stats.TokenStatsAccumulator`,
    accumulates the answer tokens' log-probabilities and entropies (on device).
    """
    rows = logits.shape[0]
    device = logits.device
    tokens = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    vocab = stop_table.shape[0]
    for step in range(max_new_tokens):
        logits = logits[:, :vocab]
        if bool(greedy_rows.all()):
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temps, dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(greedy_rows, logits.argmax(-1), sampled)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        tokens[:, step] = nxt
        stop_now = stop_table[nxt] & ~finished
        if token_stats is not None:
            token_stats.update(logits, nxt, ~finished & ~stop_now)
        lengths = torch.where(stop_now, torch.full_like(lengths, step), lengths)
        finished = finished | stop_now
        # One host sync per step: stop as soon as every row has ended its answer.
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(
            input_ids=nxt.unsqueeze(1),
            attention_mask=attn,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    return tokens, lengths


def _clean(text: str) -> str:
    return first_line(text)


def first_line(text: str) -> str:
    """An answer as the teacher keeps it: its first line, stripped."""
    return text.split("\n", 1)[0].strip()


@torch.inference_mode()
def prefill_states(
    model: Any, tokenizer: Any, prompts: list[str], *, pool_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prefill of *prompts* (left-padded batch), no generation: the last-token states
    ``[B, L+1, H]`` at every layer and, with *pool_start*, the states mean-pooled over the
    prompt tokens from that position on (as :func:`sample_answers` returns them). What a
    proxy model reads of prompts another model answers."""
    if tokenizer.padding_side != "left":
        raise ValueError("prefill_states needs a left-padding tokenizer")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=left_pad_positions(attn),
        use_cache=False,
        output_hidden_states=True,
    )
    hidden = torch.stack([h[:, -1, :] for h in out.hidden_states], dim=1)
    pooled = None if pool_start is None else pool_hidden_states(out.hidden_states, attn, pool_start)
    return hidden, pooled


@torch.inference_mode()
def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    n_samples: int = 10,
    temperature: float = 1.0,
    default_temperature: float = 0.0,
    max_new_tokens: int = 16,
    generator: torch.Generator | None = None,
    return_hidden: bool = True,
    stop_table: torch.Tensor | None = None,
    pool_start: int | None = None,
) -> SampledAnswers:
    """Sample ``n_samples`` answers at ``temperature`` and one default answer per prompt.

    ``default_temperature=0`` means greedy. Sampling uses the full distribution (no
    top-k / top-p), as the teacher of the SSD paper does. Answers stop at the first
    newline or end-of-text token and are stripped. With ``pool_start`` (and
    ``return_hidden``) the hidden states are also mean-pooled over every prompt token at
    position ``pool_start`` or later, at every layer.
    """
    if not prompts:
        return SampledAnswers([], [], None)
    device = next(model.parameters()).device
    if stop_table is None:
        stop_table = stop_token_table(tokenizer, device)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
    if tokenizer.padding_side != "left":
        raise ValueError("sample_answers needs a left-padding tokenizer")
    rows = n_samples + 1
    tokens, lengths, hidden, pooled = sample_token_ids(
        model,
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        n_samples=n_samples,
        temperature=temperature,
        default_temperature=default_temperature,
        max_new_tokens=max_new_tokens,
        stop_table=stop_table,
        pad_token_id=tokenizer.pad_token_id,
        generator=generator,
        return_hidden=return_hidden,
        pool_start=pool_start,
    )
    texts = tokenizer.batch_decode(
        [row[: int(n)].tolist() for row, n in zip(tokens.cpu(), lengths.cpu())],
        skip_special_tokens=True,
    )
    texts = [_clean(t) for t in texts]
    b = int(enc["input_ids"].shape[0])
    default = texts[::rows]
    samples = [texts[i * rows + 1 : (i + 1) * rows] for i in range(b)]
    return SampledAnswers(default, samples, hidden, pooled)


def sample_token_ids(
    model: Any,
    input_ids: torch.Tensor,
    attn: torch.Tensor,
    *,
    n_samples: int,
    temperature: float,
    default_temperature: float,
    max_new_tokens: int,
    stop_table: torch.Tensor,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    return_hidden: bool = False,
    pool_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The token side of :func:`sample_answers`: one prefill of the left-padded batch, its
    KV cache repeated for ``n_samples + 1`` rows per prompt (the first greedy unless
    ``default_temperature > 0``), one batched decode. Returns ``(tokens [B*R, T],
    lengths [B*R], last-token states [B, L+1, H] or None, pooled states or None)``, all
    on the model's device (no host copy)."""
    pos = left_pad_positions(attn)
    out = model(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=pos,
        use_cache=True,
        output_hidden_states=return_hidden,
    )
    hidden = None
    if return_hidden:
        hidden = torch.stack([h[:, -1, :] for h in out.hidden_states], dim=1)
    pooled = None
    if return_hidden and pool_start is not None:
        pooled = pool_hidden_states(out.hidden_states, attn, pool_start)
    rows = n_samples + 1
    b = input_ids.shape[0]
    device = input_ids.device
    cache = out.past_key_values
    cache.batch_repeat_interleave(rows)
    logits = out.logits[:, -1, :].float().repeat_interleave(rows, dim=0)  # [B*R, V]
    attn = attn.repeat_interleave(rows, dim=0)
    next_pos = pos[:, -1:].repeat_interleave(rows, dim=0) + 1
    is_default = torch.zeros(b * rows, dtype=torch.bool, device=device)
    is_default[::rows] = True
    temps = torch.full((b * rows, 1), float(temperature), device=device)
    temps[is_default] = max(default_temperature, 1e-6)
    greedy_rows = is_default if default_temperature <= 0 else torch.zeros_like(is_default)
    tokens, lengths = decode_loop(
        model,
        cache,
        logits,
        attn,
        next_pos,
        temps=temps,
        greedy_rows=greedy_rows,
        max_new_tokens=max_new_tokens,
        stop_table=stop_table,
        pad_token_id=pad_token_id,
        generator=generator,
    )
    return tokens, lengths, hidden, pooled


def pool_weights(attention_mask: torch.Tensor, pool_start: int) -> torch.Tensor:
    """``[B, T, 1]`` weights of the real tokens at position ``>= pool_start`` (the question
    after a shared few-shot prefix) of a left-padded batch; a row without any falls back
    to its last token."""
    keep = attention_mask.bool() & (left_pad_positions(attention_mask) >= pool_start)
    last = torch.zeros_like(keep)
    last[:, -1] = True
    keep = torch.where(keep.any(-1, keepdim=True), keep, last)
    return keep.float().unsqueeze(-1)


def pool_hidden_states(
    hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    attention_mask: torch.Tensor,
    pool_start: int,
) -> torch.Tensor:
    """Mean over the :func:`pool_weights` tokens of every layer: ``[B, L, H]`` float32."""
    w = pool_weights(attention_mask, pool_start)
    denom = w.sum(1)  # [B, 1]
    return torch.stack([(h.float() * w).sum(1) / denom for h in hidden_states], dim=1)
