"""Hostile YAML is refused fast and clearly; ``cache.ttl_s`` is
bounded (and Redis accepts the bound)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ssd_guard.errors import PolicyError
from ssd_guard.policy import (
    MAX_TTL_S,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    CacheConfig,
    Policy,
    load_policy,
)

FAST_S = 1.0  # "well under a second": typically a few milliseconds


def _bomb(levels: int, width: int = 9) -> str:
    """A 'billion laughs': width**levels scalars once the aliases are expanded."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines += ["name: bomb", "rules: []"]
    return "\n".join(lines) + "\n"


def _load_timed(tmp_path: Path, text: str, name: str = "p.yaml") -> tuple[PolicyError, float]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # names the file
    return info.value, elapsed


# ---------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("levels", [7, 9])
def test_alias_bomb_is_refused_fast(tmp_path: Path, levels: int) -> None:
    text = _bomb(levels)
    if levels == 7:
        assert len(text.encode()) < 700  # the issue's bomb was 409 bytes
    err, elapsed = _load_timed(tmp_path, text)
    assert elapsed < FAST_S, f"{elapsed:.3f} s"
    assert f"more than {MAX_YAML_NODES:,} nodes through aliases" in str(err)
    assert err.key_path == "<root>"  # type: ignore[attr-defined]


def test_alias_bomb_in_a_key_is_refused_fast(tmp_path: Path) -> None:
    err, elapsed = _load_timed(tmp_path, _bomb(9) + "? *a9\n: 1\n")
    assert elapsed < FAST_S and "alias bomb" in str(err)


def test_recursive_alias_is_a_policy_error_not_a_recursion_error(tmp_path: Path) -> None:
    err, elapsed = _load_timed(tmp_path, "name: loop\nrules: &r [*r]\n")
    assert elapsed < FAST_S
    assert str(err).endswith("rules[0]: recursive alias: the node contains itself")
    err, _ = _load_timed(tmp_path, "name: loop\nrules: [{name: &n x, when: &w {any: [*w]}}]\n")
    assert "recursive alias" in str(err) and err.key_path == "rules[0].when.any[0]"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        "[" * 5000 + "]" * 5000,  # flow lists
        "{a: " * 5000 + "1" + "}" * 5000,  # flow mappings
        "\n  " + "- " * 5000 + "x",  # block lists on one line
        "[" * 50_000,  # unclosed, and ten times deeper
    ],
    ids=["flow-list", "flow-map", "block-list", "unclosed-50k"],
)
def test_deep_nesting_is_a_policy_error_not_a_recursion_error(tmp_path: Path, body: str) -> None:
    err, elapsed = _load_timed(tmp_path, f"name: deep\nrules: {body}\n")
    assert elapsed < FAST_S, f"{elapsed:.3f} s"
    assert f"nested deeper than {MAX_YAML_DEPTH} levels" in str(err)
    assert err.key_path.startswith(("line 2, column ", "line 3, column "))  # type: ignore[attr-defined]


def test_depth_reached_only_through_aliases_is_refused(tmp_path: Path) -> None:
    half = 60  # each anchor alone is fine; one inside the other is 120 levels
    text = f"a: &a {'[' * half}{']' * half}\nname: deep\nrules: {'[' * half}*a{']' * half}\n"
    err, elapsed = _load_timed(tmp_path, text)
    assert elapsed < FAST_S
    assert "nested deeper than 100 levels once aliases are expanded" in str(err)


def test_a_value_python_cannot_build_is_a_policy_error(tmp_path: Path) -> None:
    # PyYAML's implicit timestamp resolver raised a bare ValueError for this date.
    err, _ = _load_timed(tmp_path, "name: p\ndescription: 2001-13-45\nrules: []\n")
    assert "invalid YAML value: month must be in 1..12" in str(err)


def test_ordinary_aliases_and_nesting_still_work() -> None:
    cond = "{entropy: {gt: 1.0}}"
    for _ in range(30):  # 30 levels of any = 60+ YAML levels, under the bound
        cond = "{any: [" + cond + "]}"
    text = f"""
name: shared
rules:
  - {{name: deep, scope: prompt, tags: [deep], when: {cond}, action: abstain}}
  - {{name: a, scope: prompt, when: &risky {{entropy: {{gt: 2.0}}}}, action: abstain}}
  - {{name: b, scope: answer, when: *risky, action: reject_answer}}
"""
    policy = Policy.from_yaml_text(text)
    assert policy.decide("prompt", {"entropy": 1.5}, tags=["deep"]).rule == "deep"
    assert policy.decide("prompt", {"entropy": 2.5}).rule == "a"
    assert policy.decide("answer", {"entropy": 2.5, "loglik": 0.0}).action == "reject_answer"


def test_duplicate_keys_are_still_found_under_aliases() -> None:
    text = "name: p\nx: &x {a: 1, a: 2}\nrules: []\ny: *x\n"
    with pytest.raises(PolicyError, match=r"<string>: x\.a: duplicate key 'a'"):
        Policy.from_yaml_text(text)


def test_the_guard_uses_the_same_bounded_loader(tmp_path: Path) -> None:
    from helpers.fakes import FakeScorer

    from ssd_guard.guard import Guard

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9), encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(PolicyError, match="alias bomb"):
        Guard(FakeScorer(), path)
    assert time.perf_counter() - start < FAST_S


# ---------------------------------------------------------------------------- item 9
def test_ttl_is_bounded_by_ten_years() -> None:
    assert MAX_TTL_S == 315_360_000
    assert CacheConfig(ttl_s=MAX_TTL_S).ttl_s == MAX_TTL_S
    for bad in (MAX_TTL_S + 1, 100_000_000_000_000_000_000):
        with pytest.raises(PolicyError) as info:
            Policy.from_yaml_text(f"name: p\ncache: {{ttl_s: {bad}}}\nrules: []\n", "t.yaml")
        assert str(info.value) == f"t.yaml: cache.ttl_s: must be <= {MAX_TTL_S}, got {bad}"


@pytest.mark.redis
def test_redis_accepts_the_largest_ttl_and_refuses_the_issues_one(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.set("ssd-guard-test:ttl", "1", ex=MAX_TTL_S)
        assert 0 < client.ttl("ssd-guard-test:ttl") <= MAX_TTL_S
        with pytest.raises(redis.ResponseError):  # why the schema needs a bound
            client.set("ssd-guard-test:ttl", "1", ex=100_000_000_000_000_000_000)
    finally:
        client.delete("ssd-guard-test:ttl")
        client.close()
