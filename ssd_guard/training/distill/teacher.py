"""One teacher shard: K samples and the default answer of each prompt, with the
shard's own seed. The single-process teacher (:mod:`.pipeline`) and the Ray Data actors
(:mod:`.teacher_ray`) both run :func:`sample_shard`, so they give the same results."""

from __future__ import annotations

from typing import Any

import torch

from ssd_guard.encoding import prefix_length
from ssd_guard.training.distill.recipe import Recipe

__all__ = ["prefill_shard", "sample_shard"]

_STOP_TABLES: dict[tuple[int, str], torch.Tensor] = {}


def sample_shard(
    lm: Any, recipe: Recipe, index: int, chunk: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Teacher shard *index*: K samples and the default answer of each prompt in *chunk*,
    with its per-shard seed (a resumed run, or another worker, draws exactly what an
    uninterrupted single process would). Returns the records and the tensors to save."""
    from ssd_guard.generation import sample_answers, sampling_of, stop_token_table

    t = recipe.teacher
    key = (id(lm.tokenizer), str(lm.device))
    if key not in _STOP_TABLES:  # ~one decode per vocabulary entry: once per model
        _STOP_TABLES[key] = stop_token_table(lm.tokenizer, lm.device)
    table = _STOP_TABLES[key]
    pool_start = prefix_length(lm.tokenizer, recipe.prompt.few_shot)
    gen = torch.Generator(device=lm.device).manual_seed(t.seed * 1_000_003 + index)
    records: list[dict[str, Any]] = []
    hidden: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    for b in range(0, len(chunk), t.batch_size):
        batch = chunk[b : b + t.batch_size]
        res = sample_answers(
            lm.model,
            lm.tokenizer,
            [row["text"] for row in batch],
            **sampling_of(t),
            generator=gen,
            stop_table=table,
            pool_start=pool_start if t.pool else None,
        )
        for row, d, smp in zip(batch, res.default, res.samples):
            records.append({"id": row["id"], "default": d, "samples": smp})
        assert res.hidden is not None
        hidden.append(res.hidden.to("cpu", torch.bfloat16))
        if res.pooled is not None:
            pooled.append(res.pooled.to("cpu", torch.bfloat16))
    shard = {"hidden": torch.cat(hidden)}
    if pooled:
        shard["pooled"] = torch.cat(pooled)
    return records, shard


def prefill_shard(lm: Any, recipe: Recipe, chunk: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The tensors of a shard whose answers came from elsewhere (an API model, vLLM): one
    prefill of each prompt text by *lm*, stored as :func:`sample_shard` stores them."""
    from ssd_guard.generation import prefill_states

    t = recipe.teacher
    pool_start = prefix_length(lm.tokenizer, recipe.prompt.few_shot) if t.pool else None
    hidden: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    for b in range(0, len(chunk), t.batch_size):
        texts = [str(row["text"]) for row in chunk[b : b + t.batch_size]]
        h, p = prefill_states(lm.model, lm.tokenizer, texts, pool_start=pool_start)
        hidden.append(h.to("cpu", torch.bfloat16))
        if p is not None:
            pooled.append(p.to("cpu", torch.bfloat16))
    shard = {"hidden": torch.cat(hidden)}
    if pooled:
        shard["pooled"] = torch.cat(pooled)
    return shard
