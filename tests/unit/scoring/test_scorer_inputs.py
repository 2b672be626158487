"""What an :class:`SSDScorer` accepts, and how long a prompt may be.

* Every public entry point checks its text arguments with the guard's own checks
  (:func:`ssd_guard.encoding.check_texts`): ``None``, a number, ``bytes``, a lone
  surrogate or a single string where a list is expected raise
  :class:`~ssd_guard.errors.GuardInputError` naming the argument and the index -- never a
  raw ``TypeError`` / ``UnicodeEncodeError`` from the tokenizer or the embedder.
* A formatted prompt keeps its last ``max_prompt_tokens`` tokens (the artifact's
  ``prompt.max_tokens``, else 512, capped at the base model's context), tokenizing only a
  bounded window of its end: a 200,000-character prompt is scored on the same tokens as
  its tail, and with ``on_long_prompt="error"`` it is refused before any forward pass.

Tiny random LM (``tests/helpers/tiny.py``) with a student fitted on random targets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import FEW_SHOT, LAYER, QUESTIONS, _build_artifact
from structlog.testing import capture_logs

from ssd_guard.artifact import (
    DEFAULT_MAX_PROMPT_TOKENS,
    Manifest,
    PromptFormat,
    load_artifact,
    save_artifact,
)
from ssd_guard.errors import GuardInputError, SSDGuardError
from ssd_guard.scoring.callstats import CallStats

#: About 200,000 characters, ending on the question.
HUGE = ("The history of the red planet is long and full of surprises. " * 3300)[
    :199_960
] + " What is the red planet?"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Any) -> Path:
    return _build_artifact(tmp_path_factory.mktemp("inputs-artifact"), tiny_lm, layer=LAYER)


@pytest.fixture(scope="module")
def scorer(artifact: Path, tiny_lm: Any, minilm: Any) -> Any:
    from ssd_guard.scoring.ssd import SSDScorer

    return SSDScorer.load(artifact, lm=tiny_lm, embedder=minilm, batch_size=4)


def _load(artifact: Path, tiny_lm: Any, minilm: Any, **kw: Any) -> Any:
    from ssd_guard.scoring.ssd import SSDScorer

    return SSDScorer.load(artifact, lm=tiny_lm, embedder=minilm, batch_size=4, **kw)


def _formatted(artifact: Path, question: str) -> str:
    from ssd_guard.scoring.ssd import apply_prompt_format

    fmt = load_artifact(artifact)[0].prompt
    return apply_prompt_format(question, fmt.few_shot, fmt.template)


# ------------------------------------------------------------------ argument checks
def test_a_none_answer_names_the_argument_and_index(scorer: Any) -> None:
    with pytest.raises(GuardInputError) as info:
        scorer.score_answers(["q"], [None])
    assert info.value.argument == "answers[0]"
    assert str(info.value) == "answers[0] must be a str or a list of str, got NoneType"
    assert isinstance(info.value, SSDGuardError)


def test_a_lone_surrogate_prompt_names_the_argument_and_position(scorer: Any) -> None:
    with pytest.raises(GuardInputError) as info:
        scorer.score_prompts(["a\ud800"])
    assert info.value.argument == "prompts[0]"
    assert str(info.value) == (
        "prompts[0] is not valid Unicode text: lone surrogate '\\ud800' at index 1"
    )


BAD: list[tuple[Any, str]] = [
    (None, "got NoneType"),
    (42, "got int"),
    (b"What is X?", "got bytes (decode bytes to str first)"),
    ("What is \udfffX?", "lone surrogate '\\udfff' at index 8"),
]


#: Every public text entry point, called with one bad prompt (``prompts[1]``) or one bad
#: answer (``answers[1]``).
ENTRY_POINTS: dict[str, tuple[str, Any]] = {
    "score_prompts": ("prompts", lambda s, v: s.score_prompts(["ok", v])),
    "prompt_signals": ("prompts", lambda s, v: s.prompt_signals(["ok", v])),
    "hidden": ("prompts", lambda s, v: s.hidden(["ok", v])),
    "hidden(stats)": ("prompts", lambda s, v: s.hidden(["ok", v], stats=CallStats())),
    "consensus": ("prompts", lambda s, v: s.consensus(["ok", v])),
    "score_answers(prompt)": ("prompts", lambda s, v: s.score_answers(["ok", v], ["a", "b"])),
    "answer_signals(prompt)": ("prompts", lambda s, v: s.answer_signals(["ok", v], ["a", "b"])),
    "score_answers": ("answers", lambda s, v: s.score_answers(["q1", "q2"], ["a", v])),
    "score_answers(lists)": ("answers", lambda s, v: s.score_answers(["q1", "q2"], [["a"], v])),
    "answer_signals": ("answers", lambda s, v: s.answer_signals(["q1", "q2"], ["a", v])),
    "embed_answers": ("answers", lambda s, v: s.embed_answers(["a", v])),
    "prepare_answers": ("answers", lambda s, v: s.prepare_answers(["a", v])),
}


@pytest.mark.parametrize(("value", "message"), BAD)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_bad_text_by_name(
    scorer: Any, entry: str, value: Any, message: str
) -> None:
    kind, call = ENTRY_POINTS[entry]
    with pytest.raises(GuardInputError) as info:
        call(scorer, value)
    assert info.value.argument == f"{kind}[1]"
    assert str(info.value).startswith(f"{kind}[1] ") and message in str(info.value)


def test_a_bad_candidate_in_a_list_names_both_indices(scorer: Any) -> None:
    with pytest.raises(GuardInputError) as info:
        scorer.score_answers(["q1", "q2"], [["a"], ["b", None]])
    assert info.value.argument == "answers[1][1]"
    assert "answers[1][1] must be a str, got NoneType" in str(info.value)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda s: s.score_prompts("What is X?"), "prompts"),
        (lambda s: s.score_answers(["q"], "a"), "answers"),
        (lambda s: s.embed_answers("Paris"), "answers"),
        (lambda s: s.hidden({"q": 1}), "prompts"),
        (lambda s: s.score_prompts(None), "prompts"),
        (lambda s: s.format_prompt(None), "prompt"),
    ],
)
def test_a_single_string_or_a_non_list_is_refused(scorer: Any, call: Any, argument: str) -> None:
    with pytest.raises(GuardInputError) as info:
        call(scorer)
    assert info.value.argument == argument


def test_good_input_still_scores_and_any_iterable_is_taken(scorer: Any) -> None:
    ref = scorer.score_prompts(QUESTIONS[:2])
    assert scorer.score_prompts(tuple(QUESTIONS[:2])) == ref
    assert scorer.score_prompts(q for q in QUESTIONS[:2]) == ref
    both = scorer.score_answers(QUESTIONS[:2], ["Lima", ["Shakespeare", "Marlowe"]])
    assert len(both) == 2 and len(both[1]) == 2  # type: ignore[arg-type]
    assert scorer.score_prompts([]) == []


def test_the_guard_and_the_scorer_share_one_validator() -> None:
    from ssd_guard import encoding
    from ssd_guard.guard import inputs as guard

    assert guard._check_text is encoding.check_text
    assert guard._check_texts is encoding.check_texts


# ------------------------------------------------------------------ prompt length
def test_the_default_limit_is_512_capped_at_the_context(scorer: Any) -> None:
    assert DEFAULT_MAX_PROMPT_TOKENS == 512
    ctx = scorer.encoder.model.config.max_position_embeddings
    assert scorer.max_prompt_tokens == min(512, ctx)
    m = scorer.manifest
    assert m.prompt.max_tokens is None
    assert m.prompt_token_limit(8192) == 512 and m.prompt_token_limit(100) == 100
    assert m.prompt_token_limit() == 512


def _recording_tokenizer(scorer: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length (characters) of every text the encoder's tokenizer is given."""
    tok = scorer.encoder.tokenizer
    seen: list[int] = []
    original = type(tok).__call__

    def call(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        if self is tok:
            seen.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", call)
    return seen


def test_a_200k_character_prompt_is_scored_on_its_last_tokens(
    artifact: Path, tiny_lm: Any, minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 48
    scorer = _load(artifact, tiny_lm, minilm, max_prompt_tokens=limit)
    assert scorer.max_prompt_tokens == limit and len(HUGE) > 199_000
    text = scorer.format_prompt(HUGE)
    tok = scorer.encoder.tokenizer
    kept = tok(text)["input_ids"][-limit:]  # the reference: the full text's last tokens
    want = scorer.score_prompts([tok.decode(kept)], formatted=True)[0]

    seen = _recording_tokenizer(scorer, monkeypatch)
    stats = CallStats()
    t0 = time.perf_counter()
    with capture_logs():
        got = scorer.score_prompts([HUGE], stats=stats)[0]
    print(f"\n200k-character prompt scored in {time.perf_counter() - t0:.3f} s")
    assert got == pytest.approx(want, abs=1e-4)
    assert stats.truncated and stats.forwards == 1
    # Only a bounded window of the prompt's end was ever tokenized, never the whole text.
    assert seen and max(seen) <= 32 * limit < len(HUGE) // 100
    # The kept tokens are the full text's last ones.
    enc, cut = scorer.encoder.tokenize_checked([text])
    assert cut == [True] and enc["input_ids"][0].tolist() == kept


def test_a_200k_character_answer_check_is_bounded_too(
    artifact: Path, tiny_lm: Any, minilm: Any
) -> None:
    scorer = _load(artifact, tiny_lm, minilm, max_prompt_tokens=48)
    stats = CallStats()
    (ll,) = scorer.score_answers([HUGE], ["Mars"], stats=stats)
    assert isinstance(ll, float) and stats.truncated


def test_prompts_within_the_limit_are_unchanged(scorer: Any) -> None:
    texts = [scorer.format_prompt(q) for q in QUESTIONS]
    enc, cut = scorer.encoder.tokenize_checked(texts)
    ref = scorer.encoder.tokenizer(texts, return_tensors="pt", padding=True)
    assert not any(cut)
    assert enc["input_ids"].tolist() == ref["input_ids"].tolist()
    assert scorer.encoder.too_long(texts) == [False] * len(texts)


def test_on_long_prompt_error_refuses_before_any_forward_pass(
    artifact: Path, tiny_lm: Any, minilm: Any
) -> None:
    longest = max(len(tiny_lm.tokenizer(_formatted(artifact, q))["input_ids"]) for q in QUESTIONS)
    scorer = _load(artifact, tiny_lm, minilm, max_prompt_tokens=longest, on_long_prompt="error")
    stats = CallStats()
    t0 = time.perf_counter()
    with pytest.raises(GuardInputError) as info:
        scorer.score_prompts([QUESTIONS[0], HUGE], stats=stats)
    print(f"\n200k-character prompt refused in {time.perf_counter() - t0:.3f} s")
    assert info.value.argument == "prompts[1]"
    assert f"longer than max_prompt_tokens={longest} tokens" in str(info.value)
    assert stats.forwards == 0
    for call in (
        lambda: scorer.prompt_signals([HUGE]),
        lambda: scorer.score_answers([HUGE], ["Mars"]),
        lambda: scorer.hidden([HUGE]),
    ):
        with pytest.raises(GuardInputError, match="max_prompt_tokens"):
            call()
    assert len(scorer.score_prompts(QUESTIONS)) == len(QUESTIONS)  # short ones still score


def test_on_long_prompt_error_reaches_the_guard_caller(
    artifact: Path, tiny_lm: Any, minilm: Any
) -> None:
    from ssd_guard.guard import Guard
    from ssd_guard.policy import Policy

    policy = Policy.from_yaml_text(
        "version: 1\nname: long\ndefault_action: allow\nrules:\n"
        "  - {name: p, scope: prompt, when: {entropy: {gt: 1000}}, action: log_only}\n"
    )
    scorer = _load(artifact, tiny_lm, minilm, max_prompt_tokens=48, on_long_prompt="error")
    with pytest.raises(GuardInputError, match="max_prompt_tokens"):
        Guard(scorer, policy).check_prompt(HUGE)


def test_bad_limits_are_refused(artifact: Path, tiny_lm: Any, minilm: Any) -> None:
    ctx = tiny_lm.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the base model's context"):
        _load(artifact, tiny_lm, minilm, max_prompt_tokens=ctx + 1)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        _load(artifact, tiny_lm, minilm, max_prompt_tokens=0)
    with pytest.raises(ValueError, match="on_long_prompt"):
        _load(artifact, tiny_lm, minilm, on_long_prompt="drop")


def test_the_manifest_may_record_the_limit(
    artifact: Path, tmp_path: Path, tiny_lm: Any, minilm: Any
) -> None:
    manifest, tensors = load_artifact(artifact)
    recorded = manifest.model_copy(
        update={"prompt": PromptFormat(few_shot=FEW_SHOT, max_tokens=40), "weights_sha256": ""}
    )
    save_artifact(tmp_path / "art", recorded, tensors)
    scorer = _load(tmp_path / "art", tiny_lm, minilm)
    assert scorer.max_prompt_tokens == 40
    # A recorded limit changes what long prompts score: it is part of the fingerprint...
    assert scorer.fingerprint != manifest.fingerprint
    # ... and the explicit argument wins over it.
    assert _load(tmp_path / "art", tiny_lm, minilm, max_prompt_tokens=64).max_prompt_tokens == 64


def test_a_manifest_without_the_field_reads_as_before(artifact: Path) -> None:
    raw = json.loads((artifact / "manifest.json").read_text())
    new = Manifest.model_validate(raw)
    del raw["prompt"]["max_tokens"]  # as written before the field existed
    old = Manifest.model_validate(raw)
    assert old.prompt.max_tokens is None and old.fingerprint == new.fingerprint
    # The fingerprint of every existing artifact is unchanged (the bundled risk model is
    # keyed on it).
    from ssd_guard.artifact import bundled_artifact_path

    bundled, _ = load_artifact(bundled_artifact_path())
    risk = json.loads((bundled_artifact_path() / "calibration-risk.json").read_text())
    assert bundled.fingerprint == risk["student_fingerprint"]
