import json
from pathlib import Path

import pytest
import torch
from helpers.recipes import DATA, tiny_recipe
from safetensors.torch import load_file

from ssd_guard.errors import ConfigError
from ssd_guard.training.distill import pipeline
from ssd_guard.training.distill.data import (
    is_correct,
    load_mc_jsonl,
    load_qa_jsonl,
    normalize_answer,
    split_ids,
)
from ssd_guard.training.distill.recipe import load_recipe
from ssd_guard.training.distill.workdir import Context, Workdir, load_teacher


def test_pipeline_end_to_end_and_scorer(tiny_lm_path, minilm, tmp_path) -> None:
    from ssd_guard.models import load_causal_lm
    from ssd_guard.scoring.ssd import SSDScorer

    recipe = tiny_recipe(tiny_lm_path, tmp_path / "wd")
    seen: list[tuple[str, str]] = []
    root = pipeline.run_pipeline(
        recipe, progress=False, on_stage=lambda n, s, _t: seen.append((n, s))
    )
    assert [n for n, _ in seen] == list(pipeline.STAGES)
    assert all(s == "done" for _, s in seen)
    split = json.loads((root / "split.json").read_text())
    assert sorted(len(v) for v in split.values()) == [5, 5, 10]
    assert not set(split["train"]) & set(split["test"])
    hidden = load_file(str(root / "features.safetensors"))["hidden"]
    assert hidden.shape == (20, 5, 32)
    layers = json.loads((root / "layers.json").read_text())
    assert 1 <= layers["best"] <= 4 and len(layers["table"]) == 4
    manifest = json.loads((root / "artifact" / "manifest.json").read_text())
    assert manifest["layer"] == layers["best"]
    assert manifest["training"]["n_train"] == 10 and "greedy_accuracy" in manifest["training"]
    assert set(manifest["heads"]) == {"risk", "answer"}
    # Risk head on plain PCA coordinates (the default), answer head on whitened ones.
    assert manifest["heads"]["risk"]["whitened"] is False
    assert manifest["heads"]["answer"]["whitened"] is True

    # A second run skips every stage.
    seen.clear()
    pipeline.run_pipeline(recipe, progress=False, on_stage=lambda n, s, _t: seen.append((n, s)))
    assert all(s == "skipped" for _, s in seen)

    lm = load_causal_lm(str(tiny_lm_path), device="cpu", dtype="fp32")
    scorer = SSDScorer.load(root / "artifact", lm=lm, embedder=minilm)
    ent = scorer.score_prompts(["What is the capital of Peru?", "Who wrote Hamlet?"])
    assert len(ent) == 2 and all(torch.isfinite(torch.tensor(ent)))
    ll = scorer.score_answers(
        ["Who wrote Hamlet?", "Capital of Peru?"], [["Shakespeare", "Lima", "x"], ["Lima"]]
    )
    assert [len(x) for x in ll] == [3, 1]
    # Scoring a precomputed hidden state equals scoring the text.
    h = scorer.hidden(["Who wrote Hamlet?"])
    assert scorer.entropy_from_hidden(h).item() == pytest.approx(ent[1], abs=1e-5)
    # Answers in a head's own target space: plain PCA for the risk head.
    pca = scorer.embedder.pca
    z_plain = scorer.embed_answers(["Lima"], head="risk")
    z_white = scorer.embedder.embed(["Lima"], dim=4)
    assert torch.allclose(z_plain, z_white * pca.scale[:4], atol=1e-6)
    # The hidden states stored by the teacher stage are what the encoder computes.
    prompts = [json.loads(x) for x in (root / "prompts.jsonl").read_text().splitlines()]
    enc = scorer.hidden([prompts[0]["text"]], formatted=True)
    assert torch.allclose(enc[0], hidden[0, scorer.layer].float(), atol=1e-3)


def test_resume_after_crash_matches_uninterrupted(tiny_lm_path, tmp_path) -> None:
    full = tiny_recipe(tiny_lm_path, tmp_path / "full")
    pipeline.run_pipeline(full, progress=False, until="teacher")

    crashed = tiny_recipe(tiny_lm_path, tmp_path / "crash")
    pipeline.run_pipeline(crashed, progress=False, until="prompts")
    wd = Workdir(tmp_path / "crash")
    ctx = Context(crashed)
    with pytest.raises(pipeline._Interrupted):
        pipeline.stage_teacher(wd, ctx, progress=False, stop_after_shards=2)
    assert len(list((tmp_path / "crash" / "teacher").glob("shard-*.jsonl"))) == 2
    assert not wd.is_done("teacher", "anything")
    pipeline.run_pipeline(crashed, progress=False, until="teacher")
    a, ha = load_teacher(Workdir(tmp_path / "full"))
    b, hb = load_teacher(wd)
    assert a == b
    assert torch.equal(ha, hb)


def test_changed_recipe_reruns_dependent_stages(tiny_lm_path, tmp_path) -> None:
    r = tiny_recipe(tiny_lm_path, tmp_path / "wd")
    pipeline.run_pipeline(r, progress=False, until="labels")
    r2 = tiny_recipe(tiny_lm_path, tmp_path / "wd", labels={"containment": False})
    seen: list[tuple[str, str]] = []
    pipeline.run_pipeline(
        r2, progress=False, until="labels", on_stage=lambda n, s, _t: seen.append((n, s))
    )
    assert seen == [("prompts", "skipped"), ("teacher", "skipped"), ("labels", "done")]


def test_layer_out_of_range_is_a_clear_error(tiny_lm_path, tmp_path) -> None:
    r = tiny_recipe(tiny_lm_path, tmp_path / "wd", layers={"fixed": 9})
    with pytest.raises(ConfigError, match=r"layers.fixed: 9 is out of range 0..4"):
        pipeline.run_pipeline(r, progress=False)


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    from ssd_guard.errors import ModelLoadError

    r = tiny_recipe(tmp_path / "no-such-model", tmp_path / "wd")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        pipeline.run_pipeline(r, progress=False, until="teacher")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ('{"answer": "x"}', "missing field 'context'"),
        ('{"context": "Question: q\\nAnswer:"}', "missing field 'answer'"),
        (
            '{"context": "Question: q\\nAnswer:", "answer": "  "}',
            "'answer' must be a non-empty string",
        ),
        ('{"context": "Q", "answer": "a", "aliases": "a"}', "'aliases' must be a list"),
        ("not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_qa_rows(tmp_path, row: str, needle: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"context": "Question: ok\\nAnswer:", "answer": "a"}\n' + row + "\n")
    with pytest.raises(ConfigError, match=rf"bad.jsonl:2: .*{needle}"):
        load_qa_jsonl(p)


def test_bad_mc_rows(tmp_path) -> None:
    p = tmp_path / "mc.jsonl"
    p.write_text('{"query": "Question: q", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(ConfigError, match="'gold' must be an index"):
        load_mc_jsonl(p)
    assert len(load_mc_jsonl(DATA / "arc_20.jsonl")) == 20


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("name: x\n", "base_model: Field required"),
        (
            "name: x\nbase_model: m\nworkdir: w\ndata: {path: p}\nteacher: {n_samples: 0}\n",
            "teacher.n_samples",
        ),
        ("name: x\nbase_model: m\nworkdir: w\ndata: {path: p}\nbogus: 1\n", "bogus: Extra inputs"),
        (
            "name: x\nbase_model: m\nworkdir: w\ndata: {path: p}\nprompt: {template: 'no slot'}\n",
            "prompt.template",
        ),
        ("name: [x\n", "invalid YAML"),
        ("- a\n", "expected a mapping"),
    ],
)
def test_bad_recipes(tmp_path, yaml_text: str, needle: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_recipe(p)


def test_shipped_recipes_validate() -> None:
    """Every shipped recipe loads: student recipes with `distill`'s loader, draft-model
    recipes (`ssd-guard distill-drafts`, the ones with a `drafts` name) with theirs."""
    from ssd_guard.training.drafts.recipe import load_draft_recipe

    paths = sorted(Path("training").glob("*.yaml"))
    drafts = [p for p in paths if "drafts" in p.stem]
    assert drafts, "the draft-model recipe ships in training/"
    for path in paths:
        recipe = load_draft_recipe(path) if path in drafts else load_recipe(path)
        assert recipe.name


def test_answer_matching() -> None:
    assert normalize_answer("The  Beatles!") == "beatles"
    assert is_correct("the Eiffel Tower", ["Eiffel Tower"])
    assert is_correct("Paris, France", ["Paris"])
    assert not is_correct("Parisian", ["Paris"])
    assert not is_correct("Paris, France", ["Paris"], containment=False)
    assert not is_correct("", ["x"])
    s = split_ids([str(i) for i in range(10)], (0.6, 0.2, 0.2), seed=1)
    assert s == split_ids([str(i) for i in range(10)], (0.6, 0.2, 0.2), seed=1)
    with pytest.raises(ConfigError):
        split_ids(["a"], (0.5, 0.5, 0.5), 0)


def test_whitened_risk_head_is_an_option(tiny_lm_path, tmp_path) -> None:
    recipe = tiny_recipe(tiny_lm_path, tmp_path / "wd", student={"whiten_risk": True})
    root = pipeline.run_pipeline(recipe, progress=False)
    manifest = json.loads((root / "artifact" / "manifest.json").read_text())
    assert manifest["heads"]["risk"]["whitened"] is True
    plain = tiny_recipe(tiny_lm_path, tmp_path / "wd")
    seen: list[tuple[str, str]] = []
    pipeline.run_pipeline(plain, progress=False, on_stage=lambda n, s, _t: seen.append((n, s)))
    # Only the student stage depends on the option.
    assert [n for n, s in seen if s == "done"] == ["student"]
