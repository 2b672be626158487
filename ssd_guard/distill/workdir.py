"""The distillation work directory and what every stage shares: atomic writes, the
:class:`Workdir` layout, the lazily loaded :class:`Context`, and readers of the prompt
and teacher files. Both :mod:`.pipeline` (the early stages and the driver) and
:mod:`.stages_late` build on it, so neither imports the other at module level."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssd_guard.distill.recipe import Recipe

__all__ = [
    "Context",
    "Workdir",
    "load_prompts",
    "load_teacher",
    "load_teacher_all",
    "prefix_length",
]


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


class Context:
    """Lazily loaded heavy objects shared by the stages of one run."""

    def __init__(self, recipe: Recipe, device: str | None = None) -> None:
        self.recipe = recipe
        self.device = device or recipe.device
        self._lm: Any = None
        self._embedder: Any = None

    @property
    def lm(self) -> Any:
        if self._lm is None:
            from ssd_guard.models import load_causal_lm

            self._lm = load_causal_lm(
                self.recipe.base_model, device=self.device, dtype=self.recipe.dtype
            )
        return self._lm

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from ssd_guard.models import load_embedder

            self._embedder = load_embedder(self.recipe.embedding.embedder, device=self.device)
        return self._embedder


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
