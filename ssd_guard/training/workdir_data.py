"""Read a distillation work directory into :class:`~ssd_guard.training.stats.Stats`.

The evaluation computes nothing the distillation already stored: hidden states come
from ``features.safetensors`` (or the teacher shards), answers from the teacher
shards, embeddings from ``embeddings.safetensors`` and labels from ``labels.jsonl``.
Missing embeddings or labels are computed on the fly (an embedder is then needed for
the embeddings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.errors import ConfigError
from ssd_guard.training.distill.data import is_correct
from ssd_guard.training.stats import Stats, embed_texts

__all__ = ["WorkdirData", "load_workdir"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@dataclass
class WorkdirData:
    """Everything the evaluation reads from one work directory (rows in prompts order)."""

    root: Path
    prompts: list[dict[str, Any]]
    split: dict[str, np.ndarray]
    stats: Stats
    correct: np.ndarray
    recipe: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, Any] = field(default_factory=dict)
    pca: dict[str, np.ndarray] | None = None

    @property
    def is_mc(self) -> bool:
        return bool(self.prompts) and "choices" in self.prompts[0]

    def split_stats(self, name: str) -> Stats:
        return self.stats.subset(self.split[name])

    def split_correct(self, name: str) -> np.ndarray:
        return np.asarray(self.correct[self.split[name]])

    def split_rows(self, name: str) -> list[dict[str, Any]]:
        return [self.prompts[i] for i in self.split[name]]

    @property
    def artifact_dir(self) -> Path:
        art = self.recipe.get("artifact")
        return Path(art) if art else self.root / "artifact"


def _load_teacher(
    root: Path, with_hidden: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    records: dict[str, dict[str, Any]] = {}
    hidden: dict[str, torch.Tensor] = {}
    for path in sorted((root / "teacher").glob("shard-*.jsonl")):
        rows = _read_jsonl(path)
        st = path.with_suffix(".safetensors")
        h = load_file(str(st))["hidden"] if with_hidden and st.exists() else None
        for i, r in enumerate(rows):
            records[str(r["id"])] = r
            if h is not None:
                hidden[str(r["id"])] = h[i]
    return records, hidden


#: The distill stages whose files :func:`load_workdir` reads.
_READ_STAGES = ("prompts", "teacher", "labels", "embed", "features", "layers")


def _check_fresh(root: Path) -> None:
    """Refuse a work directory whose files come from different runs: a stage the
    evaluation reads whose recorded inputs no longer match the stages before it (e.g.
    the data changed and only ``--until prompts`` ran since)."""
    from ssd_guard.training.distill.workdir import Workdir, stale_stages

    found = stale_stages(Workdir(root))
    stale = {k: found[k] for k in _READ_STAGES if k in found}
    if stale:
        what = "; ".join(f"{k} (older than {', '.join(v)})" for k, v in stale.items())
        raise ConfigError(
            f"{root}: stale stage outputs: {what}. Finish `ssd-guard distill` on this work "
            "directory (it reruns them) before reading it"
        )


def load_workdir(
    path: str | Path, *, embedder: Any | None = None, need_hidden: bool = True
) -> WorkdirData:
    """Load a work directory written by ``ssd-guard distill`` (stages prompts..features).

    Args:
        path: the work directory.
        embedder: used only when ``embeddings.safetensors`` is missing.
        need_hidden: load the hidden states (``features.safetensors``, else the teacher
            shards' own).
    """
    root = Path(path)
    ppath = root / "prompts.jsonl"
    if not ppath.exists():
        raise ConfigError(f"{root}: not a distillation work directory (no prompts.jsonl)")
    _check_fresh(root)
    prompts = _read_jsonl(ppath)
    ids = [str(p["id"]) for p in prompts]
    pos = {i: n for n, i in enumerate(ids)}
    split_raw = json.loads((root / "split.json").read_text(encoding="utf-8"))
    try:
        split = {
            k: np.array([pos[str(i)] for i in v], dtype=np.int64) for k, v in split_raw.items()
        }
    except KeyError as exc:
        raise ConfigError(f"{root}/split.json names an id not in prompts.jsonl: {exc}") from exc

    fpath = root / "features.safetensors"
    records, shard_hidden = _load_teacher(root, need_hidden and not fpath.exists())
    missing = [i for i in ids if i not in records]
    if missing:
        raise ConfigError(
            f"{root}: teacher answers missing for {len(missing)} prompt(s) (e.g. id "
            f"{missing[0]!r}); finish `ssd-guard distill` (stage teacher) first"
        )
    default = [str(records[i]["default"]) for i in ids]
    samples = [[str(s) for s in records[i]["samples"]] for i in ids]

    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    if need_hidden:
        if fpath.exists():
            feats = load_file(str(fpath))
            hidden = feats["hidden"]
            pooled = feats.get("pooled")
        elif shard_hidden:
            hidden = torch.stack([shard_hidden[i] for i in ids])
        if hidden is not None and hidden.shape[0] != len(ids):
            raise ConfigError(f"{fpath}: {hidden.shape[0]} rows for {len(ids)} prompts")

    epath = root / "embeddings.safetensors"
    if epath.exists():
        emb = load_file(str(epath))
        default_emb = emb["default"].float().numpy()
        sample_emb = emb["samples"].float().numpy()
    elif embedder is not None:
        k = len(samples[0])
        flat = [t for d, s in zip(default, samples, strict=True) for t in (d, *s)]
        raw = embed_texts(embedder, flat).reshape(len(ids), k + 1, -1)
        default_emb, sample_emb = raw[:, 0], raw[:, 1:]
    else:
        default_emb = sample_emb = None  # type: ignore[assignment]

    lpath = root / "labels.jsonl"
    if lpath.exists():
        lab = {str(r["id"]): bool(r["correct"]) for r in _read_jsonl(lpath)}
        correct = np.array([lab[i] for i in ids], dtype=bool)
    else:
        correct = np.array(
            [
                is_correct(d, p.get("aliases") or [p["choices"][p["gold"]]])
                if ("aliases" in p or "choices" in p)
                else False
                for d, p in zip(default, prompts, strict=True)
            ],
            dtype=bool,
        )

    recipe = (
        json.loads((root / "recipe.json").read_text()) if (root / "recipe.json").exists() else {}
    )
    layers = (
        json.loads((root / "layers.json").read_text()) if (root / "layers.json").exists() else {}
    )
    pca = None
    if (root / "pca.safetensors").exists():
        pca = {k: v.float().numpy() for k, v in load_file(str(root / "pca.safetensors")).items()}

    stats = Stats(
        prompts=[str(p.get("text", p["prompt"])) for p in prompts],
        ids=ids,
        hidden=hidden,
        pooled=pooled,
        default=default,
        samples=samples,
        default_embeddings=default_emb,
        sample_embeddings=sample_emb,
    )
    return WorkdirData(root, prompts, split, stats, correct, recipe, layers, pca)
