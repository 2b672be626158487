"""Draft-model epistemic uncertainty (DraftEU): divergences, draft training (DDD, OSD),
artifact round trip / refusal, scorer and the resumable ``distill-drafts`` pipeline, on
a tiny random Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.paths import DATA
from helpers.tiny import build_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


FEW_SHOT = "Question: What is the capital of France?\nAnswer: Paris\n\n"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ssd_guard.models import load_causal_lm

    path = build_tiny_lm(tmp_path_factory.mktemp("draft-lm") / "m")
    return load_causal_lm(str(path), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def other_lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ssd_guard.models import load_causal_lm

    path = build_tiny_lm(tmp_path_factory.mktemp("draft-lm-other") / "m", seed=1)
    return load_causal_lm(str(path), device="cpu", dtype="fp32")


def _data_dir(root: Path, n: int = 24) -> Path:
    """A minimal ``ssd-guard distill`` work directory (prompts, split, labels, teacher)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in (DATA / "triviaqa_40.jsonl").open()]
    prompts, labels, teacher = [], [], []
    rng = np.random.default_rng(0)
    for i, r in enumerate(rows[:n]):
        q = r.get("query") or r.get("question")
        prompt = f"Question: {q}\nAnswer:"
        pid = f"triviaqa:{i}"
        prompts.append(
            {"id": pid, "prompt": prompt, "text": FEW_SHOT + prompt, "source": "triviaqa"}
        )
        aliases = r.get("aliases") or ["Paris"]
        default = aliases[0]
        labels.append({"id": pid, "correct": bool(rng.random() < 0.5), "default": default})
        samples = [aliases[j % len(aliases)] + (" x" * (j % 3)) for j in range(5)]
        teacher.append({"id": pid, "default": default, "samples": samples})
    ids = [p["id"] for p in prompts]
    split = {"train": ids[: n - 6], "validation": ids[n - 6 : n - 3], "test": ids[n - 3 :]}
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "labels.jsonl").write_text("".join(json.dumps(p) + "\n" for p in labels))
    (root / "split.json").write_text(json.dumps(split))
    (root / "teacher").mkdir(exist_ok=True)
    (root / "teacher" / "shard-00000.jsonl").write_text(
        "".join(json.dumps(p) + "\n" for p in teacher)
    )
    (root / "recipe.json").write_text(json.dumps({"prompt": {"few_shot": FEW_SHOT}}))
    return root


def _recipe(tmp: Path, lm: Any, **over: Any) -> Any:
    from ssd_guard.training.drafts.recipe import DraftRecipe

    raw: dict[str, Any] = {
        "name": "tiny-drafts",
        "base_model": str(Path(lm.model.name_or_path)),
        "dtype": "fp32",
        "device": "cpu",
        "data_dir": str(_data_dir(tmp / "data")),
        "workdir": str(tmp / "work"),
        "data": {"distill_prompts": 12, "max_answer_tokens": 6},
        "draft": {"layers": [0, 1], "prompt_partitions": 2, "response_partitions": 2},
        "train": {
            "steps": 4,
            "prompts_per_step": 3,
            "lr": 1e-2,
            "warmup": 1,
            "checkpoint_every": 2,
        },
        "proxy": {"noise_scale": 0.1, "rank": 2, "perturb_layers": 2},
        "aggregate": {"features": ["eu_mean", "eu_max"], "batch_size": 4},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return DraftRecipe.model_validate(raw)


# --------------------------------------------------------------------------- divergences
def test_token_eu_against_hand_computed() -> None:
    from ssd_guard.drafts.model import mutual_information, token_eu

    f64 = torch.float64
    q1 = torch.tensor([0.5, 0.5, 1e-30], dtype=f64)
    q2 = torch.tensor([0.9, 0.1, 1e-30], dtype=f64)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=f64)
    logq = torch.stack([q1, q2]).log().unsqueeze(1)
    res = token_eu(logq, p.log().unsqueeze(0))
    m = (q1 + q2) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        return sum(float(x) * math.log(float(x) / float(y)) for x, y in zip(a, b) if x > 1e-20)

    jsd = 0.5 * (kl(q1, m) + kl(q2, m))
    assert res["jsd"].item() == pytest.approx(jsd, rel=1e-9)
    assert res["kl"].item() == pytest.approx(kl(m, p), rel=1e-9)
    # the bias-variance identity: JSD + KL(q̄ || p) = mean_k KL(q_k || p)
    assert res["eu"].item() == pytest.approx(0.5 * (kl(q1, p) + kl(q2, p)), rel=1e-9)
    # identical drafts: no variance; drafts equal to the proxy: no EU at all
    same = token_eu(torch.stack([p, p]).log().unsqueeze(1), p.log().unsqueeze(0))
    assert same["eu"].item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information(logq).item() == pytest.approx(jsd, rel=1e-9)


def test_segments_match_the_full_forward(tiny_lm: Any) -> None:
    from ssd_guard.drafts.model import (
        Segments,
        TargetParts,
        embed_segments,
        flat_logit_index,
        gather_logit_states,
        head_logits,
        run_stack,
    )

    parts = TargetParts(tiny_lm.model)
    prefix, qs, ans, grp = (
        [5, 6, 7],
        [[10, 11], [20, 21, 22, 23]],
        [[30, 31], [40], [50, 51]],
        [0, 0, 1],
    )
    seg = Segments.build(prefix, qs, ans, grp)
    with torch.no_grad():
        _, hq, ha = run_stack(parts, list(parts.layers), seg, embed_segments(parts, seg))
        logits = head_logits(parts, parts.norm(gather_logit_states(seg, hq, ha)))
        _, _, per_row = flat_logit_index(seg)
        for r, (a, g) in enumerate(zip(ans, grp)):
            ids = prefix + qs[g] + a
            ref = tiny_lm.model(input_ids=torch.tensor([ids])).logits[0]
            lo = len(prefix) + len(qs[g]) - 1
            torch.testing.assert_close(logits[per_row[r]], ref[lo : lo + len(a)], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def prepared(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ssd_guard.training.distill.workdir import Workdir
    from ssd_guard.training.drafts.train import DraftContext, load_cache, stage_cache, stage_data

    tmp = tmp_path_factory.mktemp("drafts")
    recipe = _recipe(tmp, tiny_lm)
    wd = Workdir(tmp / "work")
    ctx = DraftContext(recipe, "cpu", lm=tiny_lm)
    stage_data(wd, ctx)
    stage_cache(wd, ctx, progress=False)
    data = wd.read_json("data.json")
    cache = load_cache(wd, data, ctx.parts.num_layers - recipe.proxy.perturb_layers)
    return recipe, ctx, data, cache


def test_ddd_cells_are_disjoint_and_drafts_differ(prepared: Any) -> None:
    from ssd_guard.training.drafts.train import _seed, cell_items, train_one

    recipe, ctx, data, cache = prepared
    cells = [
        {(it.row, j) for it in cell_items(data, recipe, k) for j in it.answers}
        for k in range(recipe.n_drafts)
    ]
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            assert not cells[i] & cells[j]
    assert set().union(*cells) == {
        (it.row, j) for it in cell_items(data, recipe, None) for j in it.answers
    }
    states = [
        train_one(
            ctx.parts,
            data,
            cache,
            cell_items(data, recipe, k),
            recipe,
            sigma=0.0,
            steps=3,
            seed=_seed(0, 0),
            progress=False,
        )[0]
        for k in (0, 1)
    ]
    # same seed, different data: the drafts must not coincide
    diff = max((states[0][n] - states[1][n]).abs().max().item() for n in states[0])
    assert diff > 1e-4


def test_noiseless_osd_is_plain_distillation(prepared: Any) -> None:
    from ssd_guard.training.drafts.train import cell_items, train_one

    recipe, ctx, data, cache = prepared
    items = cell_items(data, recipe, None)
    kw = dict(steps=3, seed=7, progress=False)
    plain = train_one(ctx.parts, data, cache, items, recipe, sigma=0.0, **kw)[0]
    osd0 = train_one(
        ctx.parts,
        data,
        cache,
        items,
        recipe.model_copy(update={"proxy": recipe.proxy.model_copy(update={"noise_scale": 0.0})}),
        sigma=0.0,
        **kw,
    )[0]
    noisy = train_one(ctx.parts, data, cache, items, recipe, sigma=0.5, **kw)[0]
    for n in plain:
        assert torch.equal(plain[n], osd0[n])
    assert max((plain[n] - noisy[n]).abs().max().item() for n in plain) > 0


def test_training_resumes_exactly(prepared: Any, tmp_path: Path) -> None:
    from ssd_guard.training.drafts.train import _Interrupted, cell_items, train_one

    recipe, ctx, data, cache = prepared
    items = cell_items(data, recipe, None)
    ck = tmp_path / "ck.safetensors"
    kw: dict[str, Any] = dict(sigma=0.1, steps=4, seed=3, progress=False)
    ref = train_one(ctx.parts, data, cache, items, recipe, **kw)[0]
    with pytest.raises(_Interrupted):
        train_one(
            ctx.parts,
            data,
            cache,
            items,
            recipe,
            checkpoint=ck,
            checkpoint_key="k",
            stop_after=2,
            **kw,
        )
    resumed = train_one(
        ctx.parts, data, cache, items, recipe, checkpoint=ck, checkpoint_key="k", **kw
    )[0]
    for n in ref:
        torch.testing.assert_close(resumed[n], ref[n], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipeline_run(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from ssd_guard.training.drafts.train import run_draft_pipeline

    tmp = tmp_path_factory.mktemp("pipe")
    recipe = _recipe(tmp, tiny_lm)
    seen: list[tuple[str, str]] = []
    root = run_draft_pipeline(
        recipe, progress=False, lm=tiny_lm, on_stage=lambda n, s, _t: seen.append((n, s))
    )
    return recipe, root, seen


def test_pipeline_resumes_and_writes_artifact(pipeline_run: Any, tiny_lm: Any) -> None:
    from ssd_guard.training.drafts.train import run_draft_pipeline

    recipe, root, seen = pipeline_run
    assert all(s == "done" for _, s in seen)
    assert [n for n, _ in seen][-1] == "assemble"
    again: list[tuple[str, str]] = []
    run_draft_pipeline(
        recipe, progress=False, lm=tiny_lm, on_stage=lambda n, s, _t: again.append((n, s))
    )
    assert all(s == "skipped" for _, s in again)
    redo: list[tuple[str, str]] = []
    run_draft_pipeline(
        recipe,
        progress=False,
        lm=tiny_lm,
        force=("assemble",),
        on_stage=lambda n, s, _t: redo.append((n, s)),
    )
    assert dict(redo)["assemble"] == "done" and dict(redo)["proxy"] == "skipped"
    assert (root / "artifact" / "manifest.json").exists()


def test_artifact_round_trip_and_refusal(pipeline_run: Any, tiny_lm: Any, other_lm: Any) -> None:
    from ssd_guard.errors import ArtifactIntegrityError, ArtifactMismatchError
    from ssd_guard.scoring.base import PairScorer
    from ssd_guard.scoring.draft_eu import DraftEUScorer

    _, root, _ = pipeline_run
    art = root / "artifact"
    scorer = DraftEUScorer.load(art, tiny_lm)
    assert isinstance(scorer, PairScorer)
    assert scorer.name == "DraftEU" and scorer.signal == "draft_eu"
    cal = scorer.calibration["draft_eu"]
    assert cal == sorted(cal) and len(cal) > 0
    prompts = ["What is the capital of France?", "Who wrote Hamlet?", "Who wrote Hamlet?"]
    answers = ["Paris", "William Shakespeare", ""]
    s1 = scorer.score_pairs(prompts, answers)
    s2 = DraftEUScorer.load(art, tiny_lm).score_pairs(prompts, answers)
    assert s1[:2] == s2[:2] and all(0 < x < 1 for x in s1[:2]) and math.isnan(s1[2])
    # formatted text = few-shot + template: the same scores
    texts = [scorer.format_prompt(p) for p in prompts]
    assert scorer.score_pairs(texts, answers, formatted=True)[:2] == s1[:2]
    allv = scorer.score_pairs_all(prompts, answers)
    assert set(allv) == {"draft_eu", "eu_mean", "eu_max", "jsd_mean", "kl_mean"}
    assert allv["eu_mean"][0] == pytest.approx(allv["jsd_mean"][0] + allv["kl_mean"][0])
    assert allv["eu_max"][0] >= allv["eu_mean"][0] > 0
    with pytest.raises(ArtifactMismatchError, match="fingerprint"):
        DraftEUScorer.load(art, other_lm)
    w = art / "drafts.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0xFF
    bad = art.parent / "artifact-bad"
    bad.mkdir()
    (bad / "drafts.safetensors").write_bytes(bytes(blob))
    (bad / "manifest.json").write_text((art / "manifest.json").read_text())
    with pytest.raises(ArtifactIntegrityError):
        DraftEUScorer.load(bad, tiny_lm)


def test_cli_distill_drafts(tiny_lm: Any, tmp_path: Path) -> None:
    import yaml

    from ssd_guard.cli import main

    recipe = _recipe(tmp_path, tiny_lm, train={"steps": 2}, draft={"response_partitions": 1})
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert main(["distill-drafts", "--config", str(cfg), "--quiet", "--until", "cache"]) == 0
    assert main(["distill-drafts", "--config", str(cfg), "--quiet"]) == 0
    assert (tmp_path / "work" / "artifact" / "drafts.safetensors").exists()
    assert main(["distill-drafts", "--config", str(cfg), "--quiet", "--until", "nope"]) == 1


def test_zero_noise_teacher_is_the_target_itself(prepared: Any) -> None:
    """OSD's teacher at noise 0 is exactly the target: no perturbation is drawn, and the
    perturbed-tail forward then is the target's own (test_segments_match_the_full_forward
    pins that forward to Hugging Face's). With noise, every perturbed weight moves by the
    stated relative scale."""
    import math

    from ssd_guard.drafts.model import sample_deltas

    _recipe, ctx, _data, _cache = prepared
    parts = ctx.parts
    ids = list(range(parts.num_layers - 1, parts.num_layers))
    g = torch.Generator().manual_seed(0)
    deltas, head = sample_deltas(parts, ids, sigma=0.0, rank=2, generator=g, head=True)
    assert deltas == [None] and head is None
    sigma = 0.1
    deltas, head = sample_deltas(parts, ids, sigma=sigma, rank=4, generator=g, head=True)
    assert head is not None and deltas[0] is not None
    layer: Any = parts.layers[ids[0]]
    for name, dw in deltas[0].items():
        w = layer.get_submodule(name).weight
        rel = dw.float().pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt()
        assert 0.3 * sigma < float(rel) < 3 * sigma, (name, float(rel))
        assert not math.isclose(float(dw.abs().max()), 0.0)
