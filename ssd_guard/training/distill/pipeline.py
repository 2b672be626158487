"""`ssd-guard distill`: the stages that turn prompts into a trained SSD student.

Every stage writes into the work directory and records a ``<stage>.done.json`` marker
holding the digests of what it depends on (:data:`DEPENDS`): its recipe fields, the
content of the data files (stage ``prompts``) and the recorded output digests of the
stages it reads. A stage whose marker matches is skipped, so a killed run resumes where
it stopped, and a stage whose inputs changed reruns (logged with what changed). The
teacher stage also resumes inside itself, shard by shard, with per-shard seeds so that
a resumed run produces exactly what an uninterrupted one would; each shard records the
digest of its prompts and the teacher settings, and a shard whose digest no longer
matches is sampled again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ssd_guard.errors import ConfigError, SSDGuardError
from ssd_guard.training.distill import STAGES
from ssd_guard.training.distill.data import (
    load_mc_as_chat,
    load_mc_jsonl,
    load_open_from_mc,
    load_qa_jsonl,
    split_ids,
)
from ssd_guard.training.distill.recipe import TEACHER_EXECUTION_KEYS, Recipe
from ssd_guard.training.distill.teacher import sample_shard
from ssd_guard.training.distill.workdir import (
    Context,
    Workdir,
    _atomic_save,
    _atomic_write_text,
    file_digest,
    load_prompts,
    open_workdir,
    recorded_output,
    run_stages,
    stage_hash,
)

__all__ = ["DEPENDS", "STAGES", "Workdir", "risk_model_note", "run_pipeline"]

log = logging.getLogger("ssd_guard.training.distill")


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


#: The metadata key of a teacher shard's dependency digest (in its ``.safetensors``).
SHARD_DIGEST = "ssd_guard.deps"


def _sampling(teacher: dict[str, Any]) -> dict[str, Any]:
    """The teacher settings that change what is sampled (not how it runs)."""
    return {k: v for k, v in teacher.items() if k not in TEACHER_EXECUTION_KEYS}


def _teacher_settings(recipe: Recipe) -> str:
    d = recipe.model_dump(mode="json")
    sampling = _sampling(d["teacher"])
    if recipe.teacher.backend == "vllm":  # vLLM draws other random numbers than transformers
        sampling["sampler"] = "vllm"
    return stage_hash([d["base_model"], d["dtype"], sampling])


def shard_digest(settings: str, index: int, rows: list[dict[str, Any]]) -> str:
    """What teacher shard *index* depends on: the teacher settings, its index (its seed)
    and its prompts (ids and the exact texts the model sees)."""
    return stage_hash([settings, index, [[row["id"], row["text"]] for row in rows]])


def _shard_paths(wd: Workdir, s: int) -> tuple[Path, Path]:
    return (
        wd.path("teacher", f"shard-{s:05d}.jsonl"),
        wd.path("teacher", f"shard-{s:05d}.safetensors"),
    )


def _shard_is_current(wd: Workdir, s: int, digest: str) -> bool:
    jsonl, st = _shard_paths(wd, s)
    if not (jsonl.is_file() and st.is_file()):
        return False
    try:
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError):
        return False
    return meta.get(SHARD_DIGEST) == digest


def stage_teacher(
    wd: Workdir, ctx: Context, progress: bool = True, stop_after_shards: int | None = None
) -> dict[str, Any]:
    """Sample the teacher answers shard by shard; a completed shard is kept while its
    prompts and the teacher settings are unchanged (its recorded digest matches). With
    ``teacher.backend: ray`` the shards are sampled by Ray Data actors and written here
    as they arrive (resumable the same way)."""
    t = ctx.recipe.teacher
    prompts = load_prompts(wd)
    n_shards = (len(prompts) + t.shard_size - 1) // t.shard_size
    settings = _teacher_settings(ctx.recipe)
    digests = [
        shard_digest(settings, s, prompts[s * t.shard_size : (s + 1) * t.shard_size])
        for s in range(n_shards)
    ]
    todo = [s for s in range(n_shards) if not _shard_is_current(wd, s, digests[s])]
    stale = [s for s in todo if _shard_paths(wd, s)[0].exists()]
    # Shards past the end (the prompts got fewer) would be read as more answers.
    extra = sorted(
        p
        for p in wd.path("teacher").glob("shard-*")
        if p.suffix in (".jsonl", ".safetensors")
        and p.stem[len("shard-") :].isdigit()
        and int(p.stem[len("shard-") :]) >= n_shards
    )
    for p in extra:
        p.unlink()
    if stale or extra:
        log.info(
            "[teacher] %d of %d shard(s) kept; resampling %d whose prompts or teacher settings "
            "changed%s",
            n_shards - len(todo),
            n_shards,
            len(stale),
            f"; removed {len(extra)} file(s) of shards past the end" if extra else "",
        )
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        remaining = sum(min(t.shard_size, len(prompts) - s * t.shard_size) for s in todo)
        bar = tqdm(total=remaining, desc="teacher sampling", unit="prompt")

    def write(s: int, records: list[dict[str, Any]], shard: dict[str, torch.Tensor]) -> None:
        jsonl, st = _shard_paths(wd, s)
        _atomic_save(shard, st, meta={SHARD_DIGEST: digests[s]})
        # The JSONL is written last: its presence marks the shard complete.
        _atomic_write_text(jsonl, "".join(json.dumps(r) + "\n" for r in records))
        wd.checkpoint()

    for s in todo:  # an outdated shard stops counting as complete before anything runs
        _shard_paths(wd, s)[0].unlink(missing_ok=True)
    chunks = {s: prompts[s * t.shard_size : (s + 1) * t.shard_size] for s in todo}
    done_now = 0
    if t.backend == "ray" and todo:
        from ssd_guard.training.distill.teacher_ray import sample_shards_on_ray

        results = sample_shards_on_ray(ctx.recipe, chunks)
    elif t.backend == "chat" and todo:
        from ssd_guard.training.distill.teacher_chat import load_answer_source, sample_shard_chat

        assert t.chat is not None
        source, proxy = load_answer_source(t.chat), ctx.lm
        results = ((s, *sample_shard_chat(source, proxy, ctx.recipe, s, chunks[s])) for s in todo)
    elif t.backend == "vllm" and todo:
        from ssd_guard.training.distill.teacher_vllm import sample_shards_vllm

        results = sample_shards_vllm(ctx.recipe, ctx.lm, chunks)
    else:
        lm = ctx.lm if todo else None
        results = ((s, *sample_shard(lm, ctx.recipe, s, chunks[s])) for s in todo if lm is not None)
    for s, records, shard in results:
        write(s, records, shard)
        if bar is not None:
            bar.update(len(records))
        done_now += 1
        if stop_after_shards is not None and done_now >= stop_after_shards:
            raise _Interrupted(f"stopped after {done_now} shard(s) as asked")
    if bar is not None:
        bar.close()
    model = ctx.lm
    return {
        "n_shards": n_shards,
        "resampled": len(todo),
        "backend": t.backend,
        **({"answers_from": t.chat.model_id} if t.chat is not None else {}),
        "model_id": model.model_id,
        "fingerprint": model.fingerprint,
        "dtype": str(next(model.model.parameters()).dtype).removeprefix("torch."),
    }


class _Interrupted(RuntimeError):
    """Raised in tests to simulate a crash in the middle of sampling."""


Stage = Callable[..., dict[str, Any]]


#: What each stage reads: recipe fields (dotted paths) and the stages whose outputs it
#: reads. The ``prompts`` stage also depends on the content of the data files (and, for
#: chat prompts, on ``base_model``, whose chat template formats them).
DEPENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prompts": (("name", "data", "prompt"), ()),
    "teacher": (("base_model", "dtype", "teacher"), ("prompts",)),
    "labels": (("labels",), ("prompts", "teacher")),
    "embed": (("embedding",), ("prompts", "teacher")),
    "features": ((), ("teacher",)),
    "layers": (("layers", "student.seed"), ("prompts", "embed", "features")),
    "student": (
        ("name", "data", "prompt", "embedding", "layers", "student", "artifact"),
        ("prompts", "teacher", "labels", "embed", "features", "layers"),
    ),
}
assert tuple(DEPENDS) == STAGES


def _field(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


def _data_files(r: Recipe) -> list[Path]:
    if r.data.sources is None:
        assert r.data.path is not None
        return [r.resolve(r.data.path)]
    return [r.resolve(s.path) for s in r.data.sources]


def stage_deps(recipe: Recipe, wd: Workdir) -> Callable[[str], dict[str, str]]:
    """``deps(stage)``: the named digests a stage depends on, now (see :data:`DEPENDS`)."""
    d = recipe.model_dump(mode="json")

    def deps(name: str) -> dict[str, str]:
        fields, upstream = DEPENDS[name]
        if name == "prompts" and recipe.prompt.chat:
            fields = (*fields, "base_model")
        out = {
            f"recipe:{f}": stage_hash(_sampling(d[f]) if f == "teacher" else _field(d, f))
            for f in fields
        }
        if name == "prompts":
            for path in _data_files(recipe):
                out[f"file:{path}"] = file_digest(path)
        for up in upstream:
            out[f"stage:{up}"] = recorded_output(wd.read_marker(up))
        return out

    return deps


def stage_outputs(recipe: Recipe, wd: Workdir) -> dict[str, list[Path]]:
    """The files each stage writes (their digest goes into its marker)."""
    return {
        "prompts": [wd.path("prompts.jsonl"), wd.path("split.json")],
        "teacher": [wd.path("teacher")],
        "labels": [wd.path("labels.jsonl")],
        "embed": [wd.path("embeddings.safetensors"), wd.path("pca.safetensors")],
        "features": [wd.path("features.safetensors")],
        "layers": [wd.path("layers.json")],
        "student": [wd.path("student_grid.json"), artifact_dir(recipe, wd) / "manifest.json"],
    }


def artifact_dir(recipe: Recipe, wd: Workdir) -> Path:
    """Where the student stage writes the artifact."""
    return recipe.resolve(recipe.artifact) if recipe.artifact else wd.root / "artifact"


def _stages() -> dict[str, Stage]:
    from ssd_guard.training.distill import stages_late

    return {
        "prompts": stage_prompts,
        "teacher": stage_teacher,
        "labels": stages_late.stage_labels,
        "embed": stages_late.stage_embed,
        "features": stages_late.stage_features,
        "layers": stages_late.stage_layers,
        "student": stages_late.stage_student,
    }


def risk_model_note(artifact: Path, config: str | None = None) -> str | None:
    """A note when the student artifact at *artifact* has no usable combined risk model
    (none, or one fitted for an earlier student); ``None`` when it has one (or when there
    is no artifact)."""
    from ssd_guard.artifact import load_artifact
    from ssd_guard.scoring.risk import RISK_FILENAME

    if not (artifact / "manifest.json").is_file():
        return None
    risk = artifact / RISK_FILENAME
    src = f"--config {config}" if config else "--workdir WORKDIR"
    fix = f"ssd-guard fit-risk {src} --artifact {artifact}"
    refused = "policies whose rules read 'risk' refuse this student"
    if not risk.is_file():
        return (
            f"the student artifact {artifact} has no combined risk model ({RISK_FILENAME}); "
            f"{refused} until you fit one: {fix}"
        )
    try:
        manifest, _ = load_artifact(artifact)
        with safe_open(str(risk), framework="pt") as f:
            owner = (f.metadata() or {}).get("student_fingerprint")
    except (SSDGuardError, OSError, SafetensorError) as exc:
        log.warning("could not check %s against the student: %s", risk, exc)
        return None
    if owner != manifest.fingerprint:
        return (
            f"the student artifact {artifact} holds a {RISK_FILENAME} fitted for another "
            f"(earlier) student; {refused} until you fit it again: {fix}"
        )
    return None


def run_pipeline(
    recipe: Recipe,
    *,
    workdir: str | Path | None = None,
    until: str | None = None,
    force: tuple[str, ...] = (),
    device: str | None = None,
    progress: bool = True,
    on_stage: Callable[[str, str, float], None] | None = None,
    threads: int | None = None,
) -> Path:
    """Run (or resume) every stage of the recipe; returns the work directory.

    *threads*: torch CPU threads while it runs (default: the recipe's ``threads``, else
    ``OMP_NUM_THREADS`` when set, else min(physical cores, CPUs this process may use);
    see :func:`ssd_guard.models.use_threads`); the previous count is restored after.
    """
    from ssd_guard.models import use_threads

    wd = open_workdir(recipe, workdir, STAGES, until=until, force=force)
    ctx = Context(recipe, device)
    stages = _stages()

    def run(name: str) -> dict[str, Any]:
        if name == "teacher" and "teacher" in force:
            for p in wd.path("teacher").glob("shard-*"):  # forced: sample every shard anew
                p.unlink()
        kwargs: dict[str, Any] = {"progress": progress} if name in ("teacher", "student") else {}
        return stages[name](wd, ctx, **kwargs)

    with use_threads(threads if threads is not None else recipe.threads):
        run_stages(
            wd,
            STAGES,
            None,
            run,
            until=until,
            force=force,
            on_stage=on_stage,
            resumable=("teacher",),
            deps=stage_deps(recipe, wd),
            outputs=stage_outputs(recipe, wd),
        )
    note = risk_model_note(artifact_dir(recipe, wd), recipe.source)
    if note is not None and wd.read_marker("student") is not None:
        log.info("note: %s", note)
    return wd.root
