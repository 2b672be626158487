"""Hostile or odd policy files end as one clear :class:`PolicyError` (file, position,
reason), never a traceback: bytes YAML refuses (NUL, control characters, non-UTF-8,
tabs), files too large or with too many nodes (named as such, not as an alias bomb), and
keys YAML 1.1 reads as something other than a name (``on:`` is the boolean true). A guard
whose scorers do not provide a signal the policy reads is refused when it is built."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.fakes import FakeScorer
from helpers.policy_cli import _run

from ssd_guard.errors import ConfigError, PolicyError
from ssd_guard.guard import Guard
from ssd_guard.policy import (
    MAX_POLICY_BYTES,
    MAX_YAML_NODES,
    Policy,
    check_policy_file,
    load_policy,
)

FAST_S = 2.0

RULE = "  - {name: r, scope: prompt, when: {entropy: {gt: 1}}, action: abstain}\n"


def _write(tmp_path: Path, data: bytes | str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _refused(path: Path) -> PolicyError:
    """check-policy (the CLI and the function) refuses *path* with one clean error."""
    with pytest.raises(PolicyError) as info:
        check_policy_file(path)
    with pytest.raises(PolicyError):
        load_policy(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    return info.value


# ---------------------------------------------------------------------------- bytes
@pytest.mark.parametrize(
    ("data", "where", "reason"),
    [
        (b"name: p\nrules:\n  - name: a\x00\n", "line 3, column 12", "#x0000"),
        (b"name: p\ndescription: a\x07b\nrules: []\n", "line 2, column 15", "#x0007"),
        (b"name: p\ndescription: \x7f\nrules: []\n", "line 2, column 14", "#x007f"),
        (b"name: caf\xe9\nrules: []\n", "line 1, column 10", "not UTF-8"),
        (b"name: p\nrules:\n\t- name: a\n", "line 3, column 1", "'\\t'"),
    ],
    ids=["nul", "bell", "del", "latin-1", "tab"],
)
def test_unreadable_bytes_are_a_policy_error_naming_file_position_and_reason(
    tmp_path: Path, data: bytes, where: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, data)
    err = _refused(path)
    assert str(err).startswith(f"{path}: {where}: "), str(err)
    assert reason in str(err)
    assert _run(["check-policy", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"{path}: {where}: ") and "Traceback" not in captured.err


def test_nul_byte_reason_is_readable(tmp_path: Path) -> None:
    err = _refused(_write(tmp_path, b"name: p\x00\nrules: []\n"))
    assert "NUL" in str(err) and "not allowed in YAML" in str(err)
    assert err.key_path == "line 1, column 8"  # type: ignore[attr-defined]


def test_a_nul_byte_in_a_string_policy_too() -> None:
    with pytest.raises(PolicyError, match=r"^<string>: line 1, column 8: .*NUL"):
        Policy.from_yaml_text("name: p\x00\nrules: []\n")


# ---------------------------------------------------------------------------- size
def test_a_file_above_the_byte_limit_is_refused_up_front(tmp_path: Path) -> None:
    assert MAX_POLICY_BYTES == 1024 * 1024
    rules = "".join(
        f"  - {{name: r{i}, scope: prompt, when: {{entropy: {{gt: 1}}}}, action: abstain}}\n"
        for i in range(MAX_POLICY_BYTES // 60)
    )
    path = _write(tmp_path, f"name: big\nrules:\n{rules}")
    size = path.stat().st_size
    assert size > MAX_POLICY_BYTES
    start = time.perf_counter()
    err = _refused(path)
    assert time.perf_counter() - start < FAST_S
    assert f"file too large: {size:,} bytes > {MAX_POLICY_BYTES:,}" in str(err)
    assert "alias" not in str(err)
    with pytest.raises(PolicyError, match="file too large"):
        Guard(FakeScorer(), path)


def test_a_policy_just_under_the_byte_limit_is_read(tmp_path: Path) -> None:
    text = f"name: p\nrules:\n{RULE}"
    text += "#" * (MAX_POLICY_BYTES - len(text) - 1) + "\n"
    assert len(text) == MAX_POLICY_BYTES
    assert load_policy(_write(tmp_path, text)).name == "p"


def test_too_many_nodes_is_named_as_such_not_as_an_alias_bomb(tmp_path: Path) -> None:
    items = ",".join(["1"] * (MAX_YAML_NODES + 10))  # ~200 KB, no alias at all
    path = _write(tmp_path, f"name: p\nx: [{items}]\nrules:\n{RULE}")
    assert path.stat().st_size < MAX_POLICY_BYTES
    start = time.perf_counter()
    err = _refused(path)
    assert time.perf_counter() - start < FAST_S * 2
    assert f"too many YAML nodes: more than {MAX_YAML_NODES:,}" in str(err)
    assert "alias" not in str(err)
    assert err.key_path.startswith("line 2, column ")  # type: ignore[attr-defined]


def test_a_genuine_alias_bomb_is_still_called_one(tmp_path: Path) -> None:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    err = _refused(_write(tmp_path, "\n".join([*lines, "name: b", "rules: []"]) + "\n"))
    assert "through aliases (an alias bomb?)" in str(err)


# ---------------------------------------------------------------------------- keys
@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("on", "the boolean true"),
        ("off", "the boolean false"),
        ("yes", "the boolean true"),
        ("NO", "the boolean false"),
        ("1", "an integer"),
        ("1.5", "a number"),
        ("null", "null"),
        ("~", "null"),
        ("2024-01-01", "a date"),
    ],
)
def test_a_top_level_key_yaml_reads_as_no_name_is_named_with_its_line(
    tmp_path: Path, key: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"name: p\n{key}: 1\nrules:\n{RULE}")
    err = _refused(path)
    text = str(err)
    assert text.startswith(f"{path}: {key}: "), text
    assert f"key '{key}' on line 2" in text and what in text
    assert "True" not in text and "Keys should be strings" not in text
    assert _run(["check-policy", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_boolean_key_deeper_down_names_its_path_and_line() -> None:
    text = "name: p\nrules:\n  - name: r\n    scope: prompt\n    yes: 1\n    action: abstain\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(text, "p.yaml")
    assert str(info.value).startswith("p.yaml: rules[0].yes: key 'yes' on line 5 ")


def test_a_quoted_odd_key_is_an_unknown_key_with_its_line() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(f"name: p\n'on': 1\nrules:\n{RULE}", "p.yaml")
    assert str(info.value).startswith("p.yaml: on: unknown key 'on' on line 2 (")


def test_an_unknown_top_level_key_names_its_line() -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(f"name: p\nrules:\n{RULE}\nnmae: x\n", "p.yaml")
    assert str(info.value) == ("p.yaml: nmae: unknown key 'nmae' on line 5 (did you mean 'name'?)")


def test_merge_keys_and_quoted_names_still_work() -> None:
    text = (
        "name: p\nrules:\n"
        "  - &base {name: a, scope: prompt, when: {entropy: {gt: 2}}, action: abstain}\n"
        "  - {<<: *base, name: b, scope: answer, action: reject_answer}\n"
    )
    policy = Policy.from_yaml_text(text)
    assert [r.name for r in policy.rules] == ["a", "b"]
    assert Policy.from_mapping({"name": "p", "rules": []}).name == "p"


# ---------------------------------------------------------------------------- guard
class MinimalScorer:
    """A :class:`RiskScorer` with only ``score_prompts`` / ``score_answers``: entropy and
    loglik, no ``answer_signals`` (pmi, consensus) and no risk model."""

    name = "minimal"
    fingerprint = "minimal0"
    model_id = "m"
    layer = 0

    def __init__(self) -> None:
        self.calibration: dict[str, list[float]] = {}

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        return [1.0 for _ in prompts]

    def score_answers(self, prompts: Sequence[str], answers: Any) -> Any:
        return [[-1.0] * len(a) if isinstance(a, list) else -1.0 for a in answers]


def _policy_file(tmp_path: Path, scope: str, metric: str, action: str) -> Path:
    return _write(
        tmp_path,
        "name: p\nrules:\n"
        "  - {name: first, scope: prompt, when: {entropy: {gt: 9}}, action: abstain}\n"
        f"  - {{name: reads-it, scope: {scope}, when: {{{metric}: {{lt: -5}}}}, "
        f"action: {action}}}\n",
    )


@pytest.mark.parametrize(
    ("scope", "metric", "action"),
    [
        ("answer", "pmi", "reject_answer"),
        ("answer", "consensus", "reject_answer"),
        ("document", "pmi", "flag_poisoned"),
    ],
)
def test_a_signal_no_scorer_provides_is_refused_when_the_guard_is_built(
    tmp_path: Path, scope: str, metric: str, action: str
) -> None:
    path = _policy_file(tmp_path, scope, metric, action)
    with pytest.raises(ConfigError) as info:
        Guard(MinimalScorer(), path)
    text = str(info.value)
    assert text.startswith(f"{path}: rules[1] 'reads-it' (scope {scope}) reads '{metric}'")
    assert "answer_signals" in text and "MinimalScorer" in text and "SSDScorer" in text
    # the same policy with a scorer that has answer_signals is accepted
    Guard(FakeScorer(), path)


def test_risk_without_a_risk_model_names_the_rule(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "name: p\nrules:\n  - {name: risky, scope: prompt, when: {risk: {gt: 0.5}}, "
        "action: abstain}\n",
    )
    with pytest.raises(ConfigError, match="fit-risk") as info:
        Guard(MinimalScorer(), path)
    assert str(info.value).startswith(f"{path}: rules[0] 'risky' (scope prompt) reads 'risk'")
    with pytest.raises(ConfigError, match="fit-risk"):
        Guard(FakeScorer(risk=False), path)
    Guard(FakeScorer(), path)


def test_a_pair_signal_without_its_pair_scorer_names_the_rule(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, "answer", "semgrad", "reject_answer")
    with pytest.raises(ConfigError) as info:
        Guard(FakeScorer(), path)
    text = str(info.value)
    assert text.startswith(f"{path}: rules[1] 'reads-it' (scope answer) reads 'semgrad'")
    assert "pair_scorers" in text


def test_entropy_and_loglik_need_nothing_more(tmp_path: Path) -> None:
    guard = Guard(MinimalScorer(), _policy_file(tmp_path, "answer", "loglik", "reject_answer"))
    assert guard.check_prompt("q").action == "allow"
