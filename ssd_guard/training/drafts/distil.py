"""Distilling one draft or the proxy: the training loop, its checkpoints, the train stages."""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ssd_guard.drafts.model import (
    Draft,
    Segments,
    TargetParts,
    forward_kl,
    gather_logit_states,
    head_logits,
    question_states,
    run_stack,
    sample_deltas,
)
from ssd_guard.errors import ConfigError
from ssd_guard.training.distill.workdir import Workdir, _atomic_save, _atomic_write_text
from ssd_guard.training.drafts.data import DraftContext, TeacherCache, _segments_for, load_cache
from ssd_guard.training.drafts.recipe import DraftRecipe


def _seed(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


def autocast_for(parts: TargetParts) -> AbstractContextManager[Any]:
    if parts.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(parts.device.type, dtype=parts.dtype)
    return nullcontext()


# --------------------------------------------------------------------------- training
@dataclass
class TrainItem:
    """One prompt of a draft's training set: its row index and the answers it uses."""

    row: int
    answers: list[int]


def _pad_stack(xs: list[torch.Tensor]) -> torch.Tensor:
    n = max(x.shape[0] for x in xs)
    out = xs[0].new_zeros((len(xs), n, xs[0].shape[1]))
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out


def _teacher_logprobs(
    parts: TargetParts,
    seg: Segments,
    hidden: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor],
    tail_start: int,
    *,
    sigma: float,
    rank: int,
    head: bool,
    generator: torch.Generator,
    with_question: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = list(range(tail_start, parts.num_layers))
    deltas, hdelta = sample_deltas(
        parts, ids, sigma=sigma, rank=rank, generator=generator, head=head
    )
    layers = [parts.layers[i] for i in ids]
    _, hq, ha = run_stack(parts, layers, seg, hidden, deltas)
    states = parts.norm(gather_logit_states(seg, hq, ha))
    lp = torch.log_softmax(head_logits(parts, states, hdelta).float(), -1)
    lq = None
    if with_question:
        qs = parts.norm(question_states(seg, hq))
        lq = torch.log_softmax(head_logits(parts, qs, hdelta).float(), -1)
    return lp, lq


def _lr_at(step: int, cfg: Any, steps: int) -> float:
    if step < cfg.warmup:
        return float(cfg.lr * (step + 1) / cfg.warmup)
    frac = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return float(cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))


def _opt_tensors(draft: Draft, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, p in draft.named_parameters():
        st = opt.state.get(p)
        if st:
            out[f"adam.exp_avg.{name}"] = st["exp_avg"].detach().cpu()
            out[f"adam.exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu()
            out[f"adam.step.{name}"] = torch.as_tensor(st["step"]).detach().cpu().reshape(1).float()
    return out


def _load_opt(draft: Draft, opt: torch.optim.Optimizer, t: dict[str, torch.Tensor]) -> None:
    for name, p in draft.named_parameters():
        key = f"adam.exp_avg.{name}"
        if key in t:
            opt.state[p] = {
                "exp_avg": t[key].to(p.device),
                "exp_avg_sq": t[f"adam.exp_avg_sq.{name}"].to(p.device),
                "step": torch.tensor(float(t[f"adam.step.{name}"][0])),
            }


def train_one(
    parts: TargetParts,
    data: dict[str, Any],
    cache: TeacherCache,
    items: list[TrainItem],
    recipe: DraftRecipe,
    *,
    sigma: float,
    steps: int,
    seed: int,
    checkpoint: Path | None = None,
    checkpoint_key: str = "",
    progress: bool = True,
    desc: str = "draft",
    stop_after: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Distil one draft on ``items``; ``sigma > 0`` perturbs the teacher (OSD).

    Returns the trained state (float32) and a summary. Batches come from
    ``seed``-derived per-step generators and the noise from separate ones, so the same
    seed with ``sigma == 0`` trains exactly the plain-distillation draft, and a resume
    from ``checkpoint`` gives exactly the uninterrupted result.
    """
    cfg = recipe.train
    pcfg = recipe.proxy
    torch.manual_seed(seed)
    draft = Draft(parts, recipe.draft.layers).to(parts.device)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    meta_path = checkpoint.with_suffix(".json") if checkpoint is not None else None
    if (
        checkpoint is not None
        and meta_path is not None
        and checkpoint.exists()
        and meta_path.exists()
        and json.loads(meta_path.read_text()).get("key") == checkpoint_key
        and int(json.loads(meta_path.read_text())["step"]) <= steps
    ):
        # a checkpoint of this very stage (same recipe key): resume from it
        t = load_file(str(checkpoint))
        meta = json.loads(meta_path.read_text())
        draft.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        _load_opt(draft, opt, t)
        start = int(meta["step"])
    rows = data["rows"]
    prefix = data["prefix"]
    dev = parts.device
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=desc, unit="step")
    losses: list[float] = []
    done_now = 0
    for step in range(start, steps):
        g = torch.Generator().manual_seed(_seed(seed, step, 1))
        pick = torch.randperm(len(items), generator=g)[: cfg.prompts_per_step].tolist()
        chosen = [items[i] for i in sorted(pick)]
        sel_rows = [rows[it.row] for it in chosen]
        sel_ans = [[rows[it.row]["answers"][j] for j in it.answers] for it in chosen]
        seg = _segments_for(prefix, sel_rows, sel_ans).to(dev)
        hp = cache.prefix.unsqueeze(0).to(dev, parts.dtype) if cache.prefix is not None else None
        hq = _pad_stack([cache.q[it.row] for it in chosen]).to(dev, parts.dtype)
        ha = _pad_stack([cache.a[it.row][j] for it in chosen for j in it.answers]).to(
            dev, parts.dtype
        )
        noise = torch.Generator().manual_seed(_seed(seed, step, 2))
        with torch.no_grad():
            lp, lpq = _teacher_logprobs(
                parts,
                seg,
                (hp, hq, ha),
                cache.tail_start,
                sigma=sigma,
                rank=pcfg.rank,
                head=pcfg.perturb_head,
                generator=noise,
                with_question=cfg.loss_on_question,
            )
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg, steps)
        with autocast_for(parts):
            states, qstates = draft.forward_states(seg, with_question=cfg.loss_on_question)
            lq = torch.log_softmax(draft.logits(states).float(), -1)
            kl = forward_kl(lp, lq)
            if qstates is not None and lpq is not None and qstates.shape[0]:
                lqq = torch.log_softmax(draft.logits(qstates).float(), -1)
                kl = torch.cat([kl, forward_kl(lpq, lqq)])
            loss = kl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{float(loss):.3f}")
        done_now += 1
        last = step + 1 == steps
        if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or last):
            t = {f"model.{k}": v for k, v in draft.state_tensors().items()}
            t.update(_opt_tensors(draft, opt))
            _atomic_save(t, checkpoint)
            _atomic_write_text(
                checkpoint.with_suffix(".json"),
                json.dumps({"step": step + 1, "key": checkpoint_key}),
            )
        if stop_after is not None and done_now >= stop_after and not last:
            raise _Interrupted(f"stopped after {done_now} step(s) as asked")
    if bar is not None:
        bar.close()
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return draft.state_tensors(), {"final_kl": float(np.mean(tail)), "steps": steps}


class _Interrupted(RuntimeError):
    """Raised in tests to simulate a crash in the middle of training."""


def cell_items(data: dict[str, Any], recipe: DraftRecipe, k: int | None) -> list[TrainItem]:
    """Draft ``k``'s cell (``None``: every distillation answer, for the proxy)."""
    R = recipe.draft.response_partitions
    items = []
    for i, row in enumerate(data["rows"]):
        if k is not None and row["part"] != k // R:
            continue
        ans = [j for j, a in enumerate(row["answers"]) if k is None or a["group"] == k % R]
        if ans:
            items.append(TrainItem(i, ans))
    return items


def _stage_train(
    wd: Workdir, ctx: DraftContext, k: int | None, progress: bool = True, key: str = ""
) -> dict[str, Any]:
    r = ctx.recipe
    data = wd.read_json("data.json")
    parts = ctx.parts
    cache = load_cache(wd, data, parts.num_layers - r.proxy.perturb_layers)
    items = cell_items(data, r, k)
    if not items:
        raise ConfigError(f"draft {k}: its data cell is empty; use fewer partitions")
    name = "proxy" if k is None else f"draft-{k}"
    sigma = r.proxy.noise_scale if k is None else 0.0
    steps = (r.proxy.steps or r.train.steps) if k is None else r.train.steps
    seed = _seed(r.train.seed, -1 if k is None else k)
    t0 = time.perf_counter()
    state, info = train_one(
        parts,
        data,
        cache,
        items,
        r,
        sigma=sigma,
        steps=steps,
        seed=seed,
        checkpoint=wd.path("checkpoints", f"{name}.safetensors"),
        checkpoint_key=key,
        progress=progress,
        desc=name,
    )
    _atomic_save(state, wd.path("drafts", f"{name}.safetensors"))
    # the finished weights supersede the resumable checkpoint (weights + Adam state)
    wd.path("checkpoints", f"{name}.safetensors").unlink(missing_ok=True)
    wd.path("checkpoints", f"{name}.json").unlink(missing_ok=True)
    return {
        **info,
        "n_prompts": len(items),
        "n_answers": sum(len(it.answers) for it in items),
        "sigma": sigma,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
