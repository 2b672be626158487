"""`ssd-guard distill`: the stages that turn prompts into a trained SSD student.

Every stage writes into the work directory and records a ``<stage>.done.json`` marker
holding a hash of the recipe parts it depends on. A stage whose marker matches is
skipped, so a killed run resumes where it stopped; the teacher stage also resumes
inside itself, shard by shard, with per-shard seeds so that a resumed run produces
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssd_guard.distill.data import (
    load_mc_as_chat,
    load_mc_jsonl,
    load_open_from_mc,
    load_qa_jsonl,
    split_ids,
)
from ssd_guard.distill.recipe import Recipe
from ssd_guard.distill.workdir import (
    Context,
    Workdir,
    _atomic_save,
    _atomic_write_text,
    load_prompts,
    open_workdir,
    prefix_length,
    run_stages,
    stage_hash,
)
from ssd_guard.errors import ConfigError

__all__ = ["STAGES", "Workdir", "run_pipeline"]

log = logging.getLogger("ssd_guard.distill")


# --------------------------------------------------------------------------- stages
def stage_prompts(wd: Workdir, ctx: Context) -> dict[str, Any]:
    r = ctx.recipe
    rows: list[dict[str, Any]] = []
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    if r.data.sources is None:
        assert r.data.path is not None
        layout: list[tuple[str, str, str, int | None]] = [
            ("", r.data.path, r.data.format, r.data.limit)
        ]
    else:
        layout = [(s.name, s.path, s.format, s.limit) for s in r.data.sources]
    for name, raw_path, fmt, limit in layout:
        path = r.resolve(raw_path)
        part: list[dict[str, Any]]
        if fmt in ("qa", "open_mc", "chat_mc"):
            loader = {"qa": load_qa_jsonl, "open_mc": load_open_from_mc}.get(fmt, load_mc_as_chat)
            part = [
                {"id": e.id, "prompt": e.prompt, "answer": e.answer, "aliases": list(e.aliases)}
                | (
                    {"choices": list(e.choices), "gold": e.choices.index(e.answer)}
                    if e.choices
                    else {}
                )
                | ({"grade": "choice"} if fmt == "chat_mc" else {})
                for e in loader(path, limit)
            ]
        else:
            part = [
                {"id": e.id, "prompt": e.prompt, "choices": list(e.choices), "gold": e.gold}
                for e in load_mc_jsonl(path, limit)
            ]
        ids = [row["id"] for row in part]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{path}: duplicate row ids")
        part_splits = split_ids(ids, r.data.split, r.data.seed)
        prefix = f"{name}:" if name else ""
        for row in part:
            row["id"] = prefix + row["id"]
            row["source"] = name or r.name
        for k, v in part_splits.items():
            splits[k].extend(prefix + i for i in v)
        rows.extend(part)
    tokenizer = ctx.lm.tokenizer if r.prompt.chat else None
    with wd.path("prompts.jsonl.tmp").open("w", encoding="utf-8") as fh:
        for row in rows:
            row["text"] = r.format_prompt(row["prompt"], tokenizer)
            fh.write(json.dumps(row) + "\n")
    os.replace(wd.path("prompts.jsonl.tmp"), wd.path("prompts.jsonl"))
    _atomic_write_text(wd.path("split.json"), json.dumps(splits))
    return {"n_prompts": len(rows), **{f"n_{k}": len(v) for k, v in splits.items()}}


def stage_teacher(
    wd: Workdir, ctx: Context, progress: bool = True, stop_after_shards: int | None = None
) -> dict[str, Any]:
    """Sample the teacher answers shard by shard; completed shards are never redone."""
    from ssd_guard.generation import sample_answers, stop_token_table

    t = ctx.recipe.teacher
    prompts = load_prompts(wd)
    n_shards = (len(prompts) + t.shard_size - 1) // t.shard_size
    todo = [s for s in range(n_shards) if not wd.path("teacher", f"shard-{s:05d}.jsonl").exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        remaining = sum(min(t.shard_size, len(prompts) - s * t.shard_size) for s in todo)
        bar = tqdm(total=remaining, desc="teacher sampling", unit="prompt")
    lm = ctx.lm if todo else None
    table = stop_token_table(lm.tokenizer, lm.device) if lm is not None else None
    pool_start = prefix_length(lm.tokenizer, ctx.recipe.prompt.few_shot) if lm is not None else 0
    done_now = 0
    for s in todo:
        assert lm is not None  # todo is non-empty here
        chunk = prompts[s * t.shard_size : (s + 1) * t.shard_size]
        # Per-shard seed: a resumed run draws exactly what an uninterrupted one would.
        gen = torch.Generator(device=lm.device).manual_seed(t.seed * 1_000_003 + s)
        records: list[dict[str, Any]] = []
        hidden: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for b in range(0, len(chunk), t.batch_size):
            batch = chunk[b : b + t.batch_size]
            res = sample_answers(
                lm.model,
                lm.tokenizer,
                [row["text"] for row in batch],
                n_samples=t.n_samples,
                temperature=t.temperature,
                default_temperature=t.default_temperature,
                max_new_tokens=t.max_new_tokens,
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
            if bar is not None:
                bar.update(len(batch))
        shard = {"hidden": torch.cat(hidden)}
        if pooled:
            shard["pooled"] = torch.cat(pooled)
        _atomic_save(shard, wd.path("teacher", f"shard-{s:05d}.safetensors"))
        # The JSONL is written last: its presence marks the shard complete.
        _atomic_write_text(
            wd.path("teacher", f"shard-{s:05d}.jsonl"),
            "".join(json.dumps(r) + "\n" for r in records),
        )
        done_now += 1
        if stop_after_shards is not None and done_now >= stop_after_shards:
            raise _Interrupted(f"stopped after {done_now} shard(s) as asked")
    if bar is not None:
        bar.close()
    return {"n_shards": n_shards, "model_id": ctx.lm.model_id, "fingerprint": ctx.lm.fingerprint}


class _Interrupted(RuntimeError):
    """Raised in tests to simulate a crash in the middle of sampling."""


Stage = Callable[..., dict[str, Any]]


def _stage_keys(r: Recipe) -> dict[str, Any]:
    d = r.model_dump(mode="json")
    prompts_key = stage_hash([d["data"], d["prompt"]])
    teacher_key = stage_hash([prompts_key, d["base_model"], d["dtype"], d["teacher"]])
    labels_key = stage_hash([teacher_key, d["labels"]])
    embed_key = stage_hash([teacher_key, d["embedding"]])
    features_key = teacher_key
    layers_key = stage_hash([embed_key, d["layers"]])
    student_key = stage_hash([layers_key, labels_key, d["student"], d["artifact"]])
    return {
        "prompts": prompts_key,
        "teacher": teacher_key,
        "labels": labels_key,
        "embed": embed_key,
        "features": features_key,
        "layers": layers_key,
        "student": student_key,
    }


def _stages() -> dict[str, Stage]:
    from ssd_guard.distill import stages_late

    return {
        "prompts": stage_prompts,
        "teacher": stage_teacher,
        "labels": stages_late.stage_labels,
        "embed": stages_late.stage_embed,
        "features": stages_late.stage_features,
        "layers": stages_late.stage_layers,
        "student": stages_late.stage_student,
    }


STAGES = ("prompts", "teacher", "labels", "embed", "features", "layers", "student")


def run_pipeline(
    recipe: Recipe,
    *,
    workdir: str | Path | None = None,
    until: str | None = None,
    force: tuple[str, ...] = (),
    device: str | None = None,
    progress: bool = True,
    on_stage: Callable[[str, str, float], None] | None = None,
) -> Path:
    """Run (or resume) every stage of the recipe; returns the work directory."""
    wd = open_workdir(recipe, workdir, STAGES, until=until, force=force)
    ctx = Context(recipe, device)
    stages = _stages()

    def run(name: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"progress": progress} if name in ("teacher", "student") else {}
        return stages[name](wd, ctx, **kwargs)

    run_stages(
        wd,
        STAGES,
        _stage_keys(recipe),
        run,
        until=until,
        force=force,
        on_stage=on_stage,
        resumable=("teacher",),
    )
    return wd.root
