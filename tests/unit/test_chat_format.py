"""Students distilled in the format they guard: chat-templated prompts, multiple-choice sets
asked with their choices, answers embedded by their core."""

import json
import shutil
from pathlib import Path

import pytest
from helpers.paths import DATA

from ssd_guard.answers import answer_core, chat_prompt, grade_choice, question_stem
from ssd_guard.errors import ConfigError
from ssd_guard.training.distill import pipeline
from ssd_guard.training.distill.data import load_mc_as_chat
from ssd_guard.training.distill.recipe import Recipe

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_lm_path(tiny_lm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model with a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_lm_path, path, dirs_exist_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return path


def test_grade_choice() -> None:
    ch = ["bank", "department store", "mall", "new york"]
    assert grade_choice("B. department store", ch, True) == 1
    assert grade_choice("The answer is C.", ch, True) == 2
    assert grade_choice("(D) new york", ch, True) == 3
    assert grade_choice("A revolving door is a security measure at a bank.", ch, True) == 0
    # Repeating the whole choice list picks nothing; two choice texts pick nothing.
    assert grade_choice("A. bank\nB. department store\nC. mall", ch, True) is None
    assert grade_choice("Either a bank or a mall.", ch, True) is None
    # A choice contained in a longer one: the longer one is meant.
    assert grade_choice("a department store", ["store", "department store"], True) == 1
    assert grade_choice("No, it was paid in francs.", ["Yes", "No"], False) == 1
    assert grade_choice("Yes. Bitcoin did not exist", ["Yes", "No"], False) == 0
    assert grade_choice("I could not say.", ["Yes", "No"], False) is None


def test_answer_core_makes_sentence_and_short_form_alike() -> None:
    q = "What is the capital of Italy?"
    assert answer_core(q, "The capital of Italy is Rome.") == "Rome"
    assert answer_core(q, "Rome") == "Rome"
    assert answer_core("Who wrote Hamlet?", "William Shakespeare") == "William Shakespeare"
    # Choice lines of a multiple-choice question are not "the question" for the core.
    mc = "Where do you buy a hat?\nA. hat shop\nB. river"
    assert question_stem(mc) == "Where do you buy a hat?"
    assert answer_core(mc, "A. hat shop") == "A. hat shop"


def test_mc_rows_asked_with_their_choices() -> None:
    rows = load_mc_as_chat(DATA / "arc_20.jsonl", limit=3)
    assert len(rows) == 3
    first = rows[0]
    assert "\nA. " in first.prompt and "\nB. " in first.prompt
    assert first.answer in first.choices and first.aliases == (first.answer,)


def test_chat_prompt_uses_the_template(chat_lm_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_lm_path)
    text = chat_prompt(tok, "Who wrote Hamlet?", "Be brief.")
    assert text == "<s>system: Be brief.</s><s>user: Who wrote Hamlet?</s><s>assistant:"
    assert chat_prompt(tok, "Q?") == "<s>user: Q?</s><s>assistant:"


def test_chat_recipe_validation() -> None:
    base = {
        "name": "x",
        "base_model": "m",
        "workdir": "w",
        "data": {"path": "p"},
        "teacher": {"pool": False},
    }
    ok = Recipe.model_validate({**base, "prompt": {"chat": True, "system": "S"}})
    assert ok.prompt.chat
    with pytest.raises(ValueError, match="few_shot"):
        Recipe.model_validate({**base, "prompt": {"chat": True, "few_shot": "Q: a\nA: b\n"}})
    with pytest.raises(ValueError, match=r"teacher\.pool"):
        Recipe.model_validate({**base, "prompt": {"chat": True}, "teacher": {"pool": True}})
    with pytest.raises(ConfigError, match="tokenizer"):
        ok.format_prompt("Question: q\nAnswer:")


def test_chat_pipeline_end_to_end(chat_lm_path: Path, minilm, tmp_path: Path) -> None:
    from ssd_guard.models import load_causal_lm
    from ssd_guard.scoring.ssd import SSDScorer

    recipe = Recipe.model_validate(
        {
            "name": "tiny-chat",
            "base_model": str(chat_lm_path),
            "dtype": "fp32",
            "device": "cpu",
            "workdir": str(tmp_path / "wd"),
            "data": {
                "sources": [
                    {"name": "tq", "path": str(DATA / "triviaqa_40.jsonl"), "limit": 16},
                    {"name": "arc", "path": str(DATA / "arc_20.jsonl"), "format": "chat_mc"},
                ],
                "split": [0.5, 0.25, 0.25],
            },
            "prompt": {"chat": True, "system": "Answer briefly."},
            "teacher": {
                "n_samples": 3,
                "max_new_tokens": 5,
                "batch_size": 4,
                "shard_size": 8,
                "pool": False,
            },
            "embedding": {"pca_dim_risk": 4, "pca_dim_answer": 8, "core": True},
            "student": {
                "grid": {"n_components": [2], "hidden": [16], "depth": [1]},
                "max_epochs": 10,
                "patience": 3,
            },
        }
    )
    root = pipeline.run_pipeline(recipe, progress=False)
    prompts = [json.loads(x) for x in (root / "prompts.jsonl").read_text().splitlines()]
    assert all(p["text"].startswith("<s>system: Answer briefly.</s><s>user: ") for p in prompts)
    arc = [p for p in prompts if p["source"] == "arc"]
    assert arc and all(p["grade"] == "choice" and "\nA. " in p["text"] for p in arc)
    manifest = json.loads((root / "artifact" / "manifest.json").read_text())
    assert manifest["prompt"]["chat"] is True and manifest["prompt"]["system"] == "Answer briefly."
    assert manifest["answers"]["core_embed"] is True

    lm = load_causal_lm(str(chat_lm_path), device="cpu", dtype="fp32")
    scorer = SSDScorer.load(root / "artifact", lm=lm, embedder=minilm)
    # The scorer formats a bare question exactly as distillation did.
    q = prompts[0]["prompt"]
    assert scorer.format_prompt(q) == prompts[0]["text"]
    # A sentence answer and its short form get the same score (one core embedding).
    sig = scorer.answer_signals(
        ["What is the capital of Italy?"] * 2, ["The capital of Italy is Rome.", "Rome"]
    )
    assert sig["pmi"][0] == pytest.approx(sig["pmi"][1], abs=1e-5)
