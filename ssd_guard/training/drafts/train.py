"""`ssd-guard distill-drafts`: Data-Diverse Drafts + an Online-Stochastic-Distillation
proxy for a target, then the logistic regression that turns their EU into a risk.

Stages (each records ``stages/<stage>.done.json`` with a hash of the recipe parts it
depends on; a matching marker is skipped, so a killed run resumes):

``data``
    Train-split prompts of the ``data_dir`` work directory are shuffled (seeded); the
    first ``data.distill_prompts`` are the distillation set, the rest fit the logistic
    regression (their answers are never distilled). Each distillation prompt contributes
    the target's greedy answer and its K sampled answers (``teacher/shard-*.jsonl``: the
    target's own generations), tokenised as the scorer does.
    **Data-Diverse Drafts** (``P x R``, default 2 x 3 = 6 drafts): prompts are dealt into
    ``P`` disjoint parts, each prompt's answers (greedy = answer 0, samples 1..K) into
    ``R`` disjoint groups by ``index mod R``; draft ``k`` trains on cell
    ``(k // R, k mod R)`` only, so no two drafts share a training sequence and drafts
    of the same prompt part still see different answers to the same questions. We read
    the paper's "2×3" as this prompt-part × response-part grid: the summary gives it
    only as the best trade-off between diversity and training cost (3×3: marginal gains
    for 1.5x the drafts).
``cache``
    One target pass over every distillation sequence (the exact text it sees: few-shot
    prefix + question + answer, in the three-segment layout of
    :mod:`ssd_guard.drafts.model`) stores the hidden states that *enter* the first
    perturbed layer (layer ``L - proxy.perturb_layers``), in bf16. Every training step
    then re-runs only the target's last ``perturb_layers`` layers + norm + head for its
    teacher distributions: with noise for the proxy, without for the drafts (one code
    path, so a proxy at ``noise_scale: 0`` *is* plain distillation).
``draft-<k>``
    Draft ``k`` (target embedding + copies of ``draft.layers`` + final norm + head;
    embedding and head frozen) minimises the forward ``KL(target || draft)`` on the
    answer-token positions of its cell (``train.loss_on_question`` adds the question's
    positions). AdamW, linear warm-up then cosine decay; bf16 autocast on bf16 targets.
    Checkpoints (weights + Adam state, safetensors) every ``checkpoint_every`` steps;
    batches and noise are drawn from per-step seeds, so a resumed draft is identical to
    an uninterrupted one.
``proxy``
    The Online Stochastic Distillation proxy: same architecture, all distillation data,
    forward KL against the target with a fresh low-rank Gaussian perturbation of its last
    ``perturb_layers`` decoder layers (and head) at every step (``noise_scale`` relative
    to each weight's RMS, ``rank``). Perturbing only the last layers lets the cached
    states above stand in for the unperturbed lower part.
``assemble``
    Drafts are rounded to the storage dtype, then scored *through the scorer* on the
    held-out train rows (greedy answers, correctness labels) and the validation rows;
    the logistic regression is fitted on the former, its probabilities on the latter are
    the calibration values. Reports the mean JSD among drafts on validation (a collapse
    shows as ~0). Writes the artifact.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
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
from ssd_guard.scoring.token_stats import answer_token_ids
from ssd_guard.training.distill.workdir import (
    TargetContext,
    Workdir,
    _atomic_save,
    _atomic_write_text,
    open_workdir,
    prefix_length,
    run_stages,
    stage_hash,
)
from ssd_guard.training.drafts.recipe import DraftRecipe

__all__ = ["DraftContext", "TeacherCache", "run_draft_pipeline", "stage_names", "train_one"]


def _seed(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:7], "little")


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


def autocast_for(parts: TargetParts) -> AbstractContextManager[Any]:
    if parts.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(parts.device.type, dtype=parts.dtype)
    return nullcontext()


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


# --------------------------------------------------------------------------- assemble
def _labels(data_dir: Path) -> dict[str, dict[str, Any]]:
    return {x["id"]: x for x in _read_jsonl(data_dir / "labels.jsonl")}


def assemble_tensors(
    wd: Workdir, recipe: DraftRecipe, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for k in range(recipe.n_drafts):
        for n, v in load_file(str(wd.path("drafts", f"draft-{k}.safetensors"))).items():
            tensors[f"draft.{k}.{n}"] = v.to(dtype)
    for n, v in load_file(str(wd.path("drafts", "proxy.safetensors"))).items():
        tensors[f"proxy.{n}"] = v.to(dtype)
    return tensors


def stage_assemble(
    wd: Workdir, ctx: DraftContext, progress: bool = True, key: str = ""
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from ssd_guard.artifact import BaseModelInfo
    from ssd_guard.drafts.artifact import (
        AggregateInfo,
        DraftManifest,
        DraftPrompt,
        ProxyInfo,
        save_draft_artifact,
    )
    from ssd_guard.scoring.draft_eu import FEATURES, DraftEUScorer, lr_probability

    r = ctx.recipe
    lm = ctx.lm
    parts = ctx.parts
    data = wd.read_json("data.json")
    storage = torch.bfloat16 if parts.dtype == torch.bfloat16 else torch.float32
    tensors = assemble_tensors(wd, r, storage)
    n_feat = len(r.aggregate.features)
    # placeholder regression so the scorer can be built; replaced below
    tensors.update(
        {
            "lr.mean": torch.zeros(n_feat, dtype=torch.float64),
            "lr.scale": torch.ones(n_feat, dtype=torch.float64),
            "lr.coef": torch.zeros(n_feat, dtype=torch.float64),
            "lr.intercept": torch.zeros(1, dtype=torch.float64),
        }
    )
    manifest = DraftManifest(
        base_model=BaseModelInfo(
            id=lm.model_id,
            fingerprint=lm.fingerprint,
            hidden_size=parts.hidden_size,
            num_layers=parts.num_layers,
        ),
        layers=list(r.draft.layers),
        n_drafts=r.n_drafts,
        prompt_partitions=r.draft.prompt_partitions,
        response_partitions=r.draft.response_partitions,
        proxy=ProxyInfo(
            noise_scale=r.proxy.noise_scale,
            rank=r.proxy.rank,
            perturb_layers=r.proxy.perturb_layers,
            perturb_head=r.proxy.perturb_head,
        ),
        prompt=DraftPrompt(few_shot=data["few_shot"]),
        max_answer_tokens=r.data.max_answer_tokens,
        aggregate=AggregateInfo(
            features=list(r.aggregate.features), log_features=r.aggregate.log_features
        ),
        storage_dtype=str(storage).replace("torch.", ""),
    )
    scorer = DraftEUScorer(manifest, tensors, lm, batch_size=r.aggregate.batch_size)
    prompts = {p["id"]: p for p in _read_jsonl(ctx.data_dir / "prompts.jsonl")}
    labels = _labels(ctx.data_dir)

    def feats(ids: list[str], desc: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        ids = [i for i in ids if i in labels]
        out = np.full((len(ids), len(FEATURES)), np.nan)
        bs = 64
        it: Any = range(0, len(ids), bs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc, unit="batch")
        for s in it:
            chunk = ids[s : s + bs]
            out[s : s + bs] = scorer.sequence_features(
                [prompts[i]["text"] for i in chunk],
                [labels[i]["default"] for i in chunk],
                formatted=True,
            )
        y = np.array([0.0 if labels[i]["correct"] else 1.0 for i in ids])
        return out, y, ids

    # features depend on the drafts (the stage key): a new key never reuses old ones
    cached = wd.path(f"features-{key}.npz")
    if cached.exists():
        z = np.load(cached, allow_pickle=False)
        f_fit, y_fit, f_val, y_val = z["f_fit"], z["y_fit"], z["f_val"], z["y_val"]
    else:
        f_fit, y_fit, _ = feats(data["fit_ids"], "features (LR fit)")
        f_val, y_val, _ = feats(data["validation_ids"], "features (validation)")
        np.savez(cached, f_fit=f_fit, y_fit=y_fit, f_val=f_val, y_val=y_val)
    cols = [FEATURES.index(f) for f in r.aggregate.features]
    ok = ~np.isnan(f_fit).any(axis=1)
    x = f_fit[ok][:, cols]
    x = np.log(x + 1e-6) if r.aggregate.log_features else x
    mean, scale = x.mean(0), x.std(0) + 1e-12
    clf = LogisticRegression(C=r.aggregate.C, max_iter=1000)
    clf.fit((x - mean) / scale, y_fit[ok])
    tensors["lr.mean"] = torch.tensor(mean, dtype=torch.float64)
    tensors["lr.scale"] = torch.tensor(scale, dtype=torch.float64)
    tensors["lr.coef"] = torch.tensor(clf.coef_[0], dtype=torch.float64)
    tensors["lr.intercept"] = torch.tensor(clf.intercept_, dtype=torch.float64)
    vok = ~np.isnan(f_val).any(axis=1)
    p_val = lr_probability(f_val[vok][:, cols], tensors, r.aggregate.log_features)
    tensors["calibration.draft_eu"] = torch.tensor(np.sort(p_val), dtype=torch.float64)
    from ssd_guard.training.metrics import auroc

    stats = {
        "val_jsd_mean": float(np.nanmean(f_val[:, FEATURES.index("jsd_mean")])),
        "val_kl_mean": float(np.nanmean(f_val[:, FEATURES.index("kl_mean")])),
        "val_eu_mean": float(np.nanmean(f_val[:, FEATURES.index("eu_mean")])),
        "val_auroc_draft_eu": auroc(y_val[vok], p_val),
        "n_fit": int(ok.sum()),
        "n_validation": int(vok.sum()),
        "lr_coef": [float(c) for c in clf.coef_[0]],
    }
    markers = {}
    for name in stage_names(r):
        m = wd.marker(name)
        if m.exists():
            markers[name] = json.loads(m.read_text())
    manifest = manifest.model_copy(
        update={
            "training": {
                "recipe": r.name,
                "data_dir": r.data_dir,
                "distill_prompts": len(data["rows"]),
                "stages": {
                    k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in markers.items()
                },
                **stats,
            }
        }
    )
    out = Path(r.artifact) if r.artifact else wd.path("artifact")
    save_draft_artifact(out, manifest, tensors)
    size = sum(p.stat().st_size for p in out.iterdir())
    return {**stats, "artifact": str(out), "artifact_bytes": size}


# --------------------------------------------------------------------------- driver
Stage = Callable[..., dict[str, Any]]


def stage_names(r: DraftRecipe) -> list[str]:
    return ["data", "cache", *[f"draft-{k}" for k in range(r.n_drafts)], "proxy", "assemble"]


def _stage_keys(r: DraftRecipe) -> dict[str, str]:
    d = r.model_dump(mode="json")
    data_key = stage_hash([d["base_model"], d["data_dir"], d["data"], d["draft"]])
    cache_key = stage_hash([data_key, d["dtype"], d["proxy"]["perturb_layers"]])
    train_common = [cache_key, d["train"], d["draft"]["layers"]]
    keys = {"data": data_key, "cache": cache_key}
    for k in range(r.n_drafts):
        keys[f"draft-{k}"] = stage_hash([*train_common, k])
    keys["proxy"] = stage_hash([*train_common, d["proxy"]])
    keys["assemble"] = stage_hash(
        [keys[f"draft-{k}"] for k in range(r.n_drafts)]
        + [keys["proxy"], d["aggregate"], d["artifact"]]
    )
    return keys


def run_draft_pipeline(
    recipe: DraftRecipe,
    *,
    workdir: str | Path | None = None,
    until: str | None = None,
    force: tuple[str, ...] = (),
    device: str | None = None,
    progress: bool = True,
    on_stage: Callable[[str, str, float], None] | None = None,
    lm: Any = None,
) -> Path:
    """Run (or resume) every stage; returns the work directory."""
    names = stage_names(recipe)
    wd = open_workdir(recipe, workdir, names, until=until, force=force)
    keys = _stage_keys(recipe)
    ctx = DraftContext(recipe, device, lm=lm)

    def run(name: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {} if name == "data" else {"progress": progress}
        if name not in ("data", "cache"):
            kwargs["key"] = keys[name]
        return _stage_fn(name)(wd, ctx, **kwargs)

    run_stages(wd, names, keys, run, until=until, force=force, on_stage=on_stage)
    return wd.root


def _stage_fn(name: str) -> Stage:
    if name == "data":
        return stage_data
    if name == "cache":
        return stage_cache
    if name == "assemble":
        return stage_assemble
    if name == "proxy":
        return lambda wd, ctx, progress=True, key="": _stage_train(wd, ctx, None, progress, key)
    k = int(name.split("-", 1)[1])
    return lambda wd, ctx, progress=True, key="": _stage_train(wd, ctx, k, progress, key)
