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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssd_guard.training.distill.workdir import open_workdir, run_stages, stage_hash
from ssd_guard.training.drafts.aggregate import stage_assemble
from ssd_guard.training.drafts.data import (
    DraftContext,
    TeacherCache,
    stage_cache,
    stage_data,
    stage_names,
)

# Re-exported here, where tests and callers have always imported them from.
from ssd_guard.training.drafts.data import load_cache as load_cache
from ssd_guard.training.drafts.distil import _Interrupted as _Interrupted
from ssd_guard.training.drafts.distil import _seed as _seed
from ssd_guard.training.drafts.distil import _stage_train, train_one
from ssd_guard.training.drafts.distil import cell_items as cell_items
from ssd_guard.training.drafts.recipe import DraftRecipe

__all__ = ["DraftContext", "TeacherCache", "run_draft_pipeline", "stage_names", "train_one"]


# --------------------------------------------------------------------------- driver
Stage = Callable[..., dict[str, Any]]


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
