"""The distillation work directory and what every stage shares: atomic writes, the
:class:`Workdir` layout, the lazily loaded :class:`Context`, and readers of the prompt
and teacher files. Both :mod:`.pipeline` (the early stages and the driver) and
:mod:`.stages_late` build on it, so neither imports the other at module level."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ssd_guard.distill.recipe import Recipe
from ssd_guard.errors import ConfigError

__all__ = [
    "Context",
    "TargetContext",
    "Workdir",
    "load_prompts",
    "load_teacher",
    "load_teacher_all",
    "open_workdir",
    "prefix_length",
    "run_stages",
    "stage_hash",
]


def stage_hash(obj: Any) -> str:
    """A short hash of JSON-able recipe parts: a stage's key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


@dataclass
class Workdir:
    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def marker(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.done.json")

    def is_done(self, stage: str, key: str) -> bool:
        m = self.marker(stage)
        if not m.exists():
            return False
        return bool(json.loads(m.read_text()).get("key") == key)

    def mark_done(self, stage: str, key: str, info: dict[str, Any]) -> None:
        _atomic_write_text(self.marker(stage), json.dumps({"key": key, **info}, indent=2))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.path(*parts).read_text())


class _TargetRecipe(Protocol):
    @property
    def base_model(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str | None: ...


_R = TypeVar("_R", bound=_TargetRecipe)


class TargetContext(Generic[_R]):
    """The recipe and its base model, loaded on first use (or given as ``lm``)."""

    def __init__(self, recipe: _R, device: str | None = None, lm: Any = None) -> None:
        self.recipe = recipe
        self.device = device or recipe.device
        self._lm: Any = lm

    @property
    def lm(self) -> Any:
        if self._lm is None:
            from ssd_guard.models import load_causal_lm

            self._lm = load_causal_lm(
                self.recipe.base_model, device=self.device, dtype=self.recipe.dtype
            )
        return self._lm


class Context(TargetContext[Recipe]):
    """Lazily loaded heavy objects shared by the stages of one run."""

    def __init__(self, recipe: Recipe, device: str | None = None) -> None:
        super().__init__(recipe, device)
        self._embedder: Any = None

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from ssd_guard.models import load_embedder

            self._embedder = load_embedder(self.recipe.embedding.embedder, device=self.device)
        return self._embedder


class _WorkdirRecipe(Protocol):
    @property
    def workdir(self) -> str: ...
    def resolve(self, path: str) -> Path: ...
    def model_dump_json(self, *, indent: int | None = None) -> str: ...


def open_workdir(
    recipe: _WorkdirRecipe,
    workdir: str | Path | None,
    stages: Sequence[str],
    *,
    until: str | None = None,
    force: Collection[str] = (),
) -> Workdir:
    """Check ``until`` / ``force`` against the stage names, open the work directory (the
    recipe's ``workdir`` unless given) and record the recipe in it (``recipe.json``)."""
    if until is not None and until not in stages:
        raise ConfigError(f"unknown stage {until!r}; stages are {', '.join(stages)}")
    bad = [s for s in force if s not in stages]
    if bad:
        raise ConfigError(f"--force: unknown stage(s) {bad}; stages are {', '.join(stages)}")
    wd = Workdir(Path(workdir) if workdir else recipe.resolve(recipe.workdir))
    _atomic_write_text(wd.path("recipe.json"), recipe.model_dump_json(indent=2))
    return wd


def run_stages(
    wd: Workdir,
    stages: Sequence[str],
    keys: Mapping[str, str],
    run: Callable[[str], dict[str, Any]],
    *,
    until: str | None = None,
    force: Collection[str] = (),
    on_stage: Callable[[str, str, float], None] | None = None,
    resumable: Collection[str] = (),
) -> None:
    """Run each stage in order (``run(name)`` returns its info), skipping one whose
    ``stages/<name>.done.json`` marker holds its key unless forced; stop after ``until``.
    Seconds go to ``timings.json`` (summed over runs for the ``resumable`` stages, which
    resume inside themselves) and into the marker."""
    timings: dict[str, float] = {}
    if wd.path("timings.json").exists():
        timings = wd.read_json("timings.json")
    for name in stages:
        if wd.is_done(name, keys[name]) and name not in force:
            if on_stage:
                on_stage(name, "skipped", 0.0)
        else:
            t0 = time.perf_counter()
            info = run(name)
            dt = time.perf_counter() - t0
            timings[name] = timings.get(name, 0.0) + dt if name in resumable else dt
            _atomic_write_text(wd.path("timings.json"), json.dumps(timings, indent=2))
            wd.mark_done(name, keys[name], {**info, "seconds": round(dt, 2)})
            if on_stage:
                on_stage(name, "done", dt)
        if name == until:
            break


def load_prompts(wd: Workdir) -> list[dict[str, Any]]:
    with wd.path("prompts.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def prefix_length(tokenizer: Any, few_shot: str) -> int:
    """Tokens a prompt spends on the few-shot prefix (and special tokens) before its question."""
    alone = tokenizer(few_shot, add_special_tokens=True)["input_ids"]
    joined = tokenizer(few_shot + "Question:", add_special_tokens=True)["input_ids"]
    n = 0
    while n < min(len(alone), len(joined)) and alone[n] == joined[n]:
        n += 1
    return n


def load_teacher(wd: Workdir) -> tuple[list[dict[str, Any]], torch.Tensor]:
    records, hidden, _ = load_teacher_all(wd)
    return records, hidden


def load_teacher_all(
    wd: Workdir,
) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor | None]:
    """Records, last-token states ``[N, L+1, H]`` and pooled states (``None`` if any
    shard lacks them)."""
    records: list[dict[str, Any]] = []
    hidden: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    all_pooled = True
    for path in sorted(wd.path("teacher").glob("shard-*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            records.extend(json.loads(line) for line in fh)
        shard = load_file(str(path.with_suffix(".safetensors")))
        hidden.append(shard["hidden"])
        if "pooled" in shard:
            pooled.append(shard["pooled"])
        else:
            all_pooled = False
    h = torch.cat(hidden) if hidden else torch.empty(0)
    return records, h, torch.cat(pooled) if pooled and all_pooled else None
