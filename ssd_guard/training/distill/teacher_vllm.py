"""The teacher of ``teacher.backend: vllm``: answers sampled by vLLM, hidden states from
one transformers prefill.

vLLM loads ``base_model`` itself (the bundled models from the directory
:func:`ssd_guard.models.model_path` materialises, in the dtype the transformers copy
runs in) and is handed the very token ids the transformers teacher would sample from.
Per prompt it makes two requests: ``n_samples`` samples at ``temperature``
(``SamplingParams(n=K, temperature=T)``) and the default answer at
``default_temperature`` (0 = greedy), both stopping at the first newline (the teacher
keeps an answer's first line). Each request is seeded from ``teacher.seed`` and the
prompt's id, so a resumed run, or another batching, draws the same answers. The hidden
states the student reads come from :func:`~.teacher.prefill_shard` over the same prompt
texts (vLLM's ``extract_hidden_states`` would need its speculative-decoding path; one
prefill stopping at the last layer costs a fraction of the sampling).

vLLM draws other random numbers than transformers, so its samples are not the hf
backend's: the stage digest records the sampler, and switching backend resamples.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from ssd_guard.errors import require_extra
from ssd_guard.generation import first_line
from ssd_guard.models import model_path
from ssd_guard.training.distill.recipe import Recipe
from ssd_guard.training.distill.teacher import prefill_shard

__all__ = ["request_seed", "sample_shards_vllm"]


def request_seed(seed: int, prompt_id: Any, kind: str) -> int:
    """The seed of one vLLM request: a function of the recipe's seed, the prompt's id and
    the request (``samples`` or ``default``) only."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{kind}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _groups(chunks: dict[int, list[dict[str, Any]]], size: int) -> Iterator[list[int]]:
    """Shard indices in order, grouped so that one group holds about *size* prompts."""
    group: list[int] = []
    n = 0
    for s, chunk in chunks.items():
        group.append(s)
        n += len(chunk)
        if n >= size:
            yield group
            group, n = [], 0
    if group:
        yield group


def sample_shards_vllm(
    recipe: Recipe, lm: Any, chunks: dict[int, list[dict[str, Any]]]
) -> Iterator[tuple[int, list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """Yield ``(index, records, tensors)`` for each teacher shard in *chunks*, in order,
    the answers sampled by a vLLM engine over ``recipe.base_model`` and the states from
    *lm* (the same model in transformers). The engine is built once and freed at the end."""
    require_extra("vllm", "vllm", "teacher.backend: vllm")
    from vllm import LLM, SamplingParams

    t = recipe.teacher
    cfg = t.vllm
    options = dict(cfg.options) if cfg is not None else {}
    batch = cfg.batch_size if cfg is not None else 256
    path = model_path(recipe.base_model)
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=t.seed, **options)
    try:
        for group in _groups(chunks, batch):
            rows = [row for s in group for row in chunks[s]]
            ids = [
                lm.tokenizer(str(row["text"]))["input_ids"] for row in rows
            ]  # the tokens the hf teacher samples from
            prompts = [{"prompt_token_ids": list(x)} for x in ids]
            params = [
                SamplingParams(
                    n=t.n_samples,
                    temperature=t.temperature,
                    max_tokens=t.max_new_tokens,
                    stop=["\n"],
                    seed=request_seed(t.seed, row["id"], "samples"),
                )
                for row in rows
            ] + [
                SamplingParams(
                    n=1,
                    temperature=t.default_temperature,
                    max_tokens=t.max_new_tokens,
                    stop=["\n"],
                    seed=request_seed(t.seed, row["id"], "default"),
                )
                for row in rows
            ]
            outs = llm.generate(prompts + prompts, params, use_tqdm=False)
            n = len(rows)
            answers = [
                (
                    first_line(outs[n + i].outputs[0].text),
                    [first_line(o.text) for o in outs[i].outputs],
                )
                for i in range(n)
            ]
            start = 0
            for s in group:
                chunk = chunks[s]
                records = [
                    {"id": row["id"], "default": d, "samples": smp}
                    for row, (d, smp) in zip(
                        chunk, answers[start : start + len(chunk)], strict=True
                    )
                ]
                start += len(chunk)
                if any(len(r["samples"]) != t.n_samples for r in records):
                    raise RuntimeError(
                        f"vLLM returned fewer than {t.n_samples} samples in shard {s}"
                    )
                yield s, records, prefill_shard(lm, recipe, chunk)
    finally:
        del llm
        gc.collect()
