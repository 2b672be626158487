"""The recipe context and the ``data`` / ``cache`` stages of ``ssd-guard distill-drafts``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.drafts.model import Segments, TargetParts, run_stack
from ssd_guard.errors import ConfigError
from ssd_guard.scoring.token_stats import answer_token_ids
from ssd_guard.training.distill.workdir import (
    TargetContext,
    Workdir,
    _atomic_save,
    _atomic_write_text,
    prefix_length,
)
from ssd_guard.training.drafts.recipe import DraftRecipe


class DraftContext(TargetContext[DraftRecipe]):
    """The recipe, the loaded target (lazily) and the data directory."""

    def __init__(self, recipe: DraftRecipe, device: str | None = None, lm: Any = None) -> None:
        super().__init__(recipe, device, lm)
        self._parts: TargetParts | None = None

    @property
    def parts(self) -> TargetParts:
        if self._parts is None:
            self._parts = TargetParts(self.lm.model)
            for p in self.lm.model.parameters():
                p.requires_grad_(False)
        return self._parts

    @property
    def data_dir(self) -> Path:
        return self.recipe.resolve(self.recipe.data_dir)


def stage_names(r: DraftRecipe) -> list[str]:
    return ["data", "cache", *[f"draft-{k}" for k in range(r.n_drafts)], "proxy", "assemble"]


# --------------------------------------------------------------------------- data
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _few_shot(data_dir: Path) -> str:
    rp = data_dir / "recipe.json"
    if not rp.exists():
        return ""
    return str(json.loads(rp.read_text()).get("prompt", {}).get("few_shot", ""))


def stage_data(wd: Workdir, ctx: DraftContext) -> dict[str, Any]:
    r = ctx.recipe
    dd = ctx.data_dir
    prompts = _read_jsonl(dd / "prompts.jsonl")
    split = json.loads((dd / "split.json").read_text())
    teacher: dict[str, list[str]] = {}
    for path in sorted((dd / "teacher").glob("shard-*.jsonl")):
        for rec in _read_jsonl(path):
            teacher[rec["id"]] = [rec["default"], *rec["samples"]]
    by_id = {p["id"]: p for p in prompts}
    srcs = set(r.data.sources) if r.data.sources else None

    def keep(i: str) -> bool:
        return i in by_id and (srcs is None or by_id[i]["source"] in srcs)

    train_ids = [i for i in split["train"] if keep(i)]
    val_ids = [i for i in split["validation"] if keep(i)]
    rng = np.random.default_rng(r.data.seed)
    order = [train_ids[j] for j in rng.permutation(len(train_ids))]
    n_d = r.data.distill_prompts or len(order)
    if n_d >= len(order):
        raise ConfigError(
            f"data.distill_prompts={n_d}: the train split has {len(order)} prompts and some "
            "must remain to fit the logistic regression"
        )
    distill_ids, fit_ids = order[:n_d], order[n_d:]
    if r.aggregate.fit_prompts is not None:
        fit_ids = fit_ids[: r.aggregate.fit_prompts]
    tok = ctx.lm.tokenizer
    few = _few_shot(dd)
    n_pre = prefix_length(tok, few) if few else 0
    prefix: list[int] = []
    rows: list[dict[str, Any]] = []
    skipped = 0
    for pid in distill_ids:
        ids = [int(i) for i in tok(by_id[pid]["text"])["input_ids"]]
        if n_pre:
            if not prefix:
                prefix = ids[:n_pre]
            if ids[:n_pre] != prefix or len(ids) <= n_pre:
                skipped += 1
                continue
        q = ids[n_pre:]
        texts = teacher.get(pid, [])
        if r.data.responses == "default":
            texts = texts[:1]
        answers = []
        for j, a in enumerate(texts):
            a_ids = answer_token_ids(tok, a, r.data.max_answer_tokens)
            if a.strip() and a_ids:
                answers.append({"j": j, "ids": a_ids})
        if answers:
            rows.append({"id": pid, "q": q, "answers": answers})
    P, R = r.draft.prompt_partitions, r.draft.response_partitions
    for n, row in enumerate(rows):
        row["part"] = n % P
        for a in row["answers"]:
            a["group"] = a["j"] % R
    data = {
        "few_shot": few,
        "prefix": prefix,
        "rows": rows,
        "fit_ids": fit_ids,
        "validation_ids": val_ids,
    }
    _atomic_write_text(wd.path("data.json"), json.dumps(data))
    n_ans = sum(len(x["answers"]) for x in rows)
    return {
        "n_distill_prompts": len(rows),
        "n_distill_answers": n_ans,
        "n_fit": len(fit_ids),
        "n_validation": len(val_ids),
        "skipped_prefix_mismatch": skipped,
    }


# --------------------------------------------------------------------------- cache
@dataclass
class TeacherCache:
    """Hidden states entering the first perturbed target layer (``tail_start``)."""

    prefix: torch.Tensor | None  # [P, H]
    q: list[torch.Tensor]  # per row [Q, H]
    a: list[list[torch.Tensor]]  # per row, per answer [A, H]
    tail_start: int


def _segments_for(
    prefix: list[int], rows: list[dict[str, Any]], answers: list[list[dict[str, Any]]]
) -> Segments:
    qs, ans, groups = [], [], []
    for g, (row, al) in enumerate(zip(rows, answers)):
        qs.append(row["q"])
        for a in al:
            ans.append(a["ids"])
            groups.append(g)
    return Segments.build(prefix, qs, ans, groups)


def stage_cache(
    wd: Workdir, ctx: DraftContext, progress: bool = True, chunk: int = 8
) -> dict[str, Any]:
    data = wd.read_json("data.json")
    parts = ctx.parts
    tail = ctx.recipe.proxy.perturb_layers
    if tail >= parts.num_layers:
        raise ConfigError(f"proxy.perturb_layers={tail}: the target has {parts.num_layers}")
    start = parts.num_layers - tail
    rows = data["rows"]
    prefix = data["prefix"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="teacher cache", unit="prompt")
    tensors: dict[str, torch.Tensor] = {}
    qs: list[torch.Tensor] = []
    as_: list[torch.Tensor] = []
    lower = [parts.layers[i] for i in range(start)]
    with torch.inference_mode():
        for b in range(0, len(rows), chunk):
            part = rows[b : b + chunk]
            seg = _segments_for(prefix, part, [r["answers"] for r in part]).to(parts.device)
            from ssd_guard.drafts.model import embed_segments

            hp, hq, ha = run_stack(parts, lower, seg, embed_segments(parts, seg))
            if hp is not None and "prefix" not in tensors:
                tensors["prefix"] = hp[0].to("cpu", torch.bfloat16)
            for g, n in enumerate(seg.q_len.tolist()):
                qs.append(hq[g, :n].to("cpu", torch.bfloat16))
            for k, n in enumerate(seg.a_len.tolist()):
                as_.append(ha[k, :n].to("cpu", torch.bfloat16))
            if bar is not None:
                bar.update(len(part))
    if bar is not None:
        bar.close()
    tensors["q"] = torch.cat(qs)
    tensors["a"] = torch.cat(as_)
    _atomic_save(tensors, wd.path("cache.safetensors"), {"tail_start": str(start)})
    return {
        "tail_start": start,
        "q_tokens": int(tensors["q"].shape[0]),
        "a_tokens": int(tensors["a"].shape[0]),
    }


def load_cache(wd: Workdir, data: dict[str, Any], tail_start: int) -> TeacherCache:
    t = load_file(str(wd.path("cache.safetensors")))
    rows = data["rows"]
    q_list = list(torch.split(t["q"], [len(r["q"]) for r in rows]))
    a_flat = list(torch.split(t["a"], [len(a["ids"]) for r in rows for a in r["answers"]]))
    a_list: list[list[torch.Tensor]] = []
    pos = 0
    for r in rows:
        n = len(r["answers"])
        a_list.append(a_flat[pos : pos + n])
        pos += n
    return TeacherCache(t.get("prefix"), q_list, a_list, tail_start)
