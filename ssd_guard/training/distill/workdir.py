"""The distillation work directory and what every stage shares: atomic writes, the
:class:`Workdir` layout, the lazily loaded :class:`Context`, and readers of the prompt
and teacher files. Both :mod:`.pipeline` (the early stages and the driver) and
:mod:`.stages_late` build on it, so neither imports the other at module level."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from safetensors.torch import load_file, save_file

from ssd_guard.encoding import prefix_length  # re-exported: the stages read it here
from ssd_guard.errors import ConfigError
from ssd_guard.training.distill.recipe import Recipe

__all__ = [
    "Context",
    "TargetContext",
    "Workdir",
    "file_digest",
    "load_prompts",
    "load_teacher",
    "load_teacher_all",
    "open_workdir",
    "prefix_length",
    "recorded_output",
    "run_stages",
    "stage_hash",
    "stale_stages",
]

log = logging.getLogger("ssd_guard.training.distill")


def stage_hash(obj: Any) -> str:
    """A short hash of JSON-able recipe parts: a stage's key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(*paths: Path) -> str:
    """A short sha256 of the bytes of *paths* (a directory: of every file under it, by
    relative path, ``.tmp`` files skipped); a missing path hashes as missing."""
    h = hashlib.sha256()
    for p in paths:
        if p.is_dir():
            files = sorted(
                (q.relative_to(p).as_posix(), q)
                for q in p.rglob("*")
                if q.is_file() and not q.name.endswith(".tmp")
            )
        else:
            files = [("", p)]
        for name, f in files:
            h.update(name.encode() + b"\0")
            if not f.is_file():
                h.update(b"\0missing\0")
                continue
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()[:16]


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
    #: Called by :meth:`checkpoint` (set by :func:`run_stages` while a stage runs).
    _on_checkpoint: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def marker(self, stage: str) -> Path:
        return self.path("stages", f"{stage}.done.json")

    def read_marker(self, stage: str) -> dict[str, Any] | None:
        """The stage's ``done`` marker (its key, dependency digests, output digest and
        info), ``None`` when the stage has not completed."""
        m = self.marker(stage)
        if not m.is_file():
            return None
        try:
            data = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_done(self, stage: str, key: str) -> bool:
        m = self.read_marker(stage)
        return m is not None and m.get("key") == key

    def mark_done(
        self,
        stage: str,
        key: str,
        info: dict[str, Any],
        *,
        deps: Mapping[str, str] | None = None,
        outputs: str | None = None,
    ) -> None:
        extra: dict[str, Any] = {}
        if deps is not None:
            extra["deps"] = dict(deps)
        if outputs is not None:
            extra["outputs"] = outputs
        _atomic_write_text(self.marker(stage), json.dumps({"key": key, **extra, **info}, indent=2))

    def checkpoint(self) -> None:
        """Record the running stage's time so far in ``timings.json``: a resumable stage
        calls it after each unit (teacher shard) it completes, so that a killed run's
        time is kept and a resumed run adds to it."""
        if self._on_checkpoint is not None:
            self._on_checkpoint()

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


def recorded_output(marker: Mapping[str, Any] | None) -> str:
    """What a stage's marker says its outputs were: their digest (else its key), which
    the stages after it depend on."""
    if marker is None:
        return "<not run>"
    return str(marker.get("outputs") or marker.get("key") or "<unknown>")


def _changed(old: Mapping[str, Any] | None, new: Mapping[str, str]) -> list[str]:
    """The dependency names whose digests differ between a marker's and now."""
    if old is None:
        return ["(no dependency record: written by an older ssd-guard)"]
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _describe(dep: str) -> str:
    kind, _, what = dep.partition(":")
    return {
        "recipe": f"recipe field {what!r}",
        "file": f"data file {what} (its content)",
        "stage": f"the output of stage {what!r}",
    }.get(kind, dep)


class _StageClock:
    """Wall time spent on one stage's current outputs: this run's elapsed time plus,
    for a resumable stage resumed with the same key, what earlier runs recorded at
    their last checkpoint (``stages/<name>.progress.json``)."""

    def __init__(
        self,
        wd: Workdir,
        name: str,
        key: str,
        timings: dict[str, float],
        *,
        resumable: bool,
        carry: bool,
    ) -> None:
        self.wd, self.name, self.key, self.timings = wd, name, key, timings
        self.resumable = resumable
        self.progress = wd.path("stages", f"{name}.progress.json")
        self.base = 0.0
        if resumable and carry and self.progress.is_file():
            try:
                prev = json.loads(self.progress.read_text(encoding="utf-8"))
                if prev.get("key") == key:
                    self.base = float(prev.get("seconds", 0.0))
            except (OSError, ValueError, TypeError, AttributeError):
                self.base = 0.0
        self.t0 = time.perf_counter()
        self.total = self.base

    @property
    def this_run(self) -> float:
        return time.perf_counter() - self.t0

    def tick(self) -> None:
        self.total = self.base + self.this_run
        self.timings[self.name] = round(self.total, 3)
        _atomic_write_text(self.wd.path("timings.json"), json.dumps(self.timings, indent=2))
        if self.resumable:
            _atomic_write_text(
                self.progress, json.dumps({"key": self.key, "seconds": round(self.total, 3)})
            )


def run_stages(
    wd: Workdir,
    stages: Sequence[str],
    keys: Mapping[str, str] | None,
    run: Callable[[str], dict[str, Any]],
    *,
    until: str | None = None,
    force: Collection[str] = (),
    on_stage: Callable[[str, str, float], None] | None = None,
    resumable: Collection[str] = (),
    deps: Callable[[str], Mapping[str, str]] | None = None,
    outputs: Mapping[str, Sequence[Path]] | None = None,
) -> None:
    """Run each stage in order (``run(name)`` returns its info), skipping one whose
    ``stages/<name>.done.json`` marker holds its key unless forced; stop after ``until``.

    A stage's key is ``keys[name]``, or, with *deps*, the hash of ``deps(name)``: named
    digests of what the stage depends on (recipe fields, input files, upstream stages'
    recorded output digests), computed just before the stage is checked so that it sees
    what the stages before it wrote. The marker records them, and a rerun logs which of
    them changed. With *outputs* (files a stage writes), a stage whose outputs are
    missing reruns, and the marker records their digest (``outputs``), which the
    stages after it depend on. A stage's marker is removed before it runs, so a crash
    never leaves an old marker beside new outputs.

    Seconds go to ``timings.json`` and into the marker: for a ``resumable`` stage (one
    that resumes inside itself and calls :meth:`Workdir.checkpoint` after each unit),
    the time of every run since its key last changed, recorded at each checkpoint.
    """
    timings: dict[str, float] = {}
    if wd.path("timings.json").exists():
        try:
            timings = {k: float(v) for k, v in wd.read_json("timings.json").items()}
        except (ValueError, TypeError, AttributeError):
            timings = {}
    for name in stages:
        stage_deps = dict(deps(name)) if deps is not None else None
        if stage_deps is not None:
            key = stage_hash(stage_deps)
        else:
            assert keys is not None, "run_stages needs keys or deps"
            key = keys[name]
        marker = wd.read_marker(name)
        missing = [p for p in (outputs or {}).get(name, ()) if not p.exists()]
        done = marker is not None and marker.get("key") == key and not missing
        if done and name not in force:
            if on_stage:
                on_stage(name, "skipped", 0.0)
        else:
            if name in force:
                log.info("[%s] forced: rerunning", name)
            elif marker is not None and marker.get("key") != key:
                if stage_deps is not None:
                    what = [_describe(d) for d in _changed(marker.get("deps"), stage_deps)]
                    log.info(
                        "[%s] rerunning: changed since its last run: %s", name, "; ".join(what)
                    )
                else:
                    log.info("[%s] rerunning: its recipe settings changed", name)
            elif marker is not None:
                log.info("[%s] rerunning: outputs missing: %s", name, ", ".join(map(str, missing)))
            wd.marker(name).unlink(missing_ok=True)
            clock = _StageClock(
                wd, name, key, timings, resumable=name in resumable, carry=name not in force
            )
            wd._on_checkpoint = clock.tick if clock.resumable else None
            try:
                info = run(name)
            finally:
                wd._on_checkpoint = None
            dt = clock.this_run
            clock.tick()
            digest = file_digest(*outputs[name]) if outputs and name in outputs else None
            wd.mark_done(
                name,
                key,
                {**info, "seconds": round(clock.total, 2)},
                deps=stage_deps,
                outputs=digest,
            )
            clock.progress.unlink(missing_ok=True)
            if on_stage:
                on_stage(name, "done", dt)
        if name == until:
            break


def stale_stages(wd: Workdir) -> dict[str, list[str]]:
    """Completed stages whose recorded inputs no longer match what the stages before
    them hold now (e.g. ``--until prompts`` after the data changed leaves the later
    stages' files from the old data): ``{stage: [upstream stages that changed]}``.
    Markers without dependency records (older work directories) are not checked."""
    out: dict[str, list[str]] = {}
    stages_dir = wd.root / "stages"
    if not stages_dir.is_dir():
        return out
    for m in sorted(stages_dir.glob("*.done.json")):
        name = m.name[: -len(".done.json")]
        marker = wd.read_marker(name)
        deps = (marker or {}).get("deps")
        if not isinstance(deps, dict):
            continue
        bad = []
        for dep, digest in sorted(deps.items()):
            kind, _, up = dep.partition(":")
            if kind != "stage":
                continue
            if recorded_output(wd.read_marker(up)) != digest:
                bad.append(up)
        if bad:
            out[name] = bad
    return out


def load_prompts(wd: Workdir) -> list[dict[str, Any]]:
    with wd.path("prompts.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


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
