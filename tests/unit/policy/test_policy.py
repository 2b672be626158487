"""Policy schema, loading errors, decisions and descriptions."""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path

import pytest
from helpers.paths import BAD_POLICIES as BAD_DIR
from helpers.paths import ROOT

from ssd_guard.errors import PolicyError
from ssd_guard.policy import (
    CacheConfig,
    Condition,
    Decision,
    Policy,
    Rule,
    Threshold,
    default_policy_path,
    describe_policy,
    load_default_policy,
    load_policy,
)

SHIPPED = sorted((ROOT / "policies").glob("*.yaml"))

CAL = {
    "entropy": [float(i) for i in range(101)],  # quantile q -> 100 q
    "loglik": [float(-100 + i) for i in range(101)],  # quantile q -> -100 + 100 q
    "pmi": [float(-100 + i) for i in range(101)],  # quantile q -> -100 + 100 q
}


def _expectation(path: Path) -> tuple[str, str]:
    """The '# expect: KEY.PATH | reason' first line (empty.yaml: see INDEX.txt)."""
    text = path.read_text(encoding="utf-8")
    if not text:
        return "<root>", "empty"
    first = text.splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name} lacks its '# expect:' line"
    key_path, reason = (part.strip() for part in first.removeprefix("# expect:").split("|", 1))
    return key_path, reason


BAD_FILES = sorted(BAD_DIR.glob("*.yaml"))


def test_there_are_enough_malformed_fixtures() -> None:
    assert len(BAD_FILES) >= 30


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_malformed_policy_is_rejected_with_file_and_key_path(path: Path) -> None:
    key_path, reason = _expectation(path)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith(f"{path}: {key_path}"), first_line
    assert reason in first_line
    assert info.value.source == str(path)  # type: ignore[attr-defined]
    if not key_path.startswith("line "):
        assert info.value.key_path == key_path  # type: ignore[attr-defined]


def test_error_message_exact_form() -> None:
    text = """
name: p
rules:
  - {name: a, scope: prompt, when: {entropy: {gt: 1}}, action: allow}
  - {name: b, scope: prompt, when: {entropy: {gt: 1}}, action: allow}
  - {name: c, scope: prompt, when: {entropy: {gt: oops}}, action: abstain}
"""
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(text, source="policies/x.yaml")
    assert (
        str(info.value)
        == "policies/x.yaml: rules[2].when.entropy.gt: expected a number, got a string"
    )


def test_several_problems_one_line_each() -> None:
    text = "name: p\ncolour: red\nrules:\n  - {name: a, scope: nowhere, action: allow}\n"
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml_text(text, source="p.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("p.yaml: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"rules[0].scope", "colour"}


def test_missing_file_and_directory() -> None:
    with pytest.raises(PolicyError, match=r"nope\.yaml: <root>: file not found"):
        load_policy("nope.yaml")
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(BAD_DIR)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.yaml"
    p.write_bytes(b"name: caf\xe9\nrules: []\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(p)


# ---------------------------------------------------------------------------- shipped files
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_policies_are_valid(path: Path) -> None:
    policy = load_policy(path)
    assert policy.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert policy.source == str(path)
    text = describe_policy(policy)
    for rule in policy.rules:
        assert f"rule '{rule.name}'" in text


def test_shipped_set_is_complete() -> None:
    assert {p.name for p in SHIPPED} >= {"default.yaml", "strict.yaml", "rag.yaml", "log-only.yaml"}
    strict = load_policy(ROOT / "policies" / "strict.yaml")
    assert strict.cache.fail_mode == "closed" and strict.cache.url.startswith("redis://")
    rag = load_policy(ROOT / "policies" / "rag.yaml")
    assert {r.action for r in rag.rules} >= {"retrieve", "flag_poisoned"}
    log_only = load_policy(ROOT / "policies" / "log-only.yaml")
    assert all(r.action not in ("abstain", "reject_answer") for r in log_only.rules)


def test_default_policy_content() -> None:
    policy = load_default_policy()
    by_name = {r.name: r for r in policy.rules}
    # Raw thresholds chosen on outcomes (benchmarks/outcome_thresholds.py).
    risky = policy.decide("prompt", {"entropy": 1.0, "risk": 0.99}, calibration=CAL)
    assert risky.action == "abstain" and risky.blocking
    assert risky.thresholds == {"risk.gt": pytest.approx(0.9496)}
    answer = policy.decide("answer", {"entropy": 1.0, "risk": 0.5, "pmi": -9.0}, calibration=CAL)
    assert answer.action == "reject_answer" and answer.params == {"max_regenerations": 1}
    kept = policy.decide("answer", {"entropy": 1.0, "risk": 0.5, "pmi": -5.0}, calibration=CAL)
    assert kept.action == "log_only"
    injected = {"pmi": 1.0, "relevance": 0.9, "instruction": 0.9}
    doc = policy.decide("document", injected, calibration=CAL, source="tool")
    assert doc.rule == "injected-document" and doc.params == {"mode": "drop"}
    off = {"pmi": 1.0, "relevance": 0.1, "instruction": 0.0}
    assert policy.decide("document", off, calibration=CAL, source="retrieval").rule == (
        "off-topic-document"
    )
    # A tool output is not judged on relevance; a true on-topic document is kept.
    assert policy.decide("document", off, calibration=CAL, source="tool").action == "log_only"
    on = {"pmi": -99.0, "relevance": 0.8, "instruction": 0.0}
    assert policy.decide("document", on, calibration=CAL, source="retrieval").action == "log_only"
    calm = policy.decide("prompt", {"entropy": 10.0, "risk": 0.5}, calibration=CAL)
    assert calm.action == "log_only" and calm.rule is None and not calm.blocking
    assert set(by_name) == {
        "risky-prompt",
        "unlikely-answer",
        "injected-document",
        "off-topic-document",
    }


def test_packaged_default_is_identical_to_repo_copy() -> None:
    packaged = resources.files("ssd_guard.policies") / "default.yaml"
    assert packaged.read_bytes() == (ROOT / "policies" / "default.yaml").read_bytes()
    assert default_policy_path() == ROOT / "policies" / "default.yaml"


def test_default_policy_falls_back_to_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssd_guard.policy as policy_mod

    real_is_file = Path.is_file

    def no_repo_copy(self: Path) -> bool:
        if self == ROOT / "policies" / "default.yaml":
            return False
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", no_repo_copy)
    path = policy_mod.default_policy_path()
    assert path.parent.name == "policies" and path.parent.parent.name == "ssd_guard"
    assert load_policy(path).name == "default"


# ---------------------------------------------------------------------------- construction
def test_from_yaml_text_sha_is_of_the_bytes() -> None:
    text = "name: p\nrules: []\n"
    policy = Policy.from_yaml_text(text)
    assert policy.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert policy.source == "<string>"


def test_policy_built_in_code_has_canonical_sha() -> None:
    rule = Rule(
        name="r", scope="prompt", when=Condition(entropy=Threshold(gt=2.0)), action="abstain"
    )
    a = Policy(name="p", rules=[rule])
    b = Policy.from_mapping(
        {"name": "p", "rules": [{"name": "r", "scope": "prompt", "action": "abstain",
                                 "when": {"entropy": {"gt": 2.0}}}]}
    )  # fmt: skip
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    c = Policy(name="p", rules=[rule.model_copy(update={"action": "allow"})])
    assert c.sha256 != a.sha256


def test_empty_rules_list_is_valid_and_applies_default() -> None:
    policy = Policy.from_yaml_text("name: p\ndefault_action: log_only\nrules: []\n")
    d = policy.decide("answer", {"loglik": -1e9})
    assert (d.action, d.rule) == ("log_only", None)


def test_defaults() -> None:
    policy = Policy.from_yaml_text("name: p\nrules: []\n")
    assert policy.version == 1 and policy.student == "bundled" and policy.proxy_model is None
    assert policy.default_action == "allow"
    assert policy.cache == CacheConfig()
    assert policy.cache.url == "memory" and policy.cache.fail_mode == "open"


@pytest.mark.parametrize(
    "url", ["memory", "redis://localhost", "redis://:pw@h:6380/2", "rediss://h:6379/0",
            "unix:///run/redis.sock"],
)  # fmt: skip
def test_valid_cache_urls(url: str) -> None:
    assert CacheConfig(url=url).url == url


def test_policy_is_immutable() -> None:
    policy = Policy.from_yaml_text("name: p\nrules: []\n")
    with pytest.raises(Exception, match="frozen"):
        policy.name = "q"  # type: ignore[misc]


# ---------------------------------------------------------------------------- decisions
def _policy(rules: str, extra: str = "") -> Policy:
    return Policy.from_yaml_text(f"name: t\n{extra}rules:\n{rules}")


FIRST_MATCH = """
  - name: very-risky
    scope: prompt
    when: {entropy: {gt: 5}}
    action: abstain
    message: too risky
  - name: risky
    scope: prompt
    when: {entropy: {gt: 3}}
    action: retrieve
    k: 7
  - name: tame
    scope: prompt
    when: {entropy: {le: 3}}
    action: allow
"""


@pytest.mark.parametrize(
    ("entropy", "action", "rule"),
    [(6.0, "abstain", "very-risky"), (4.0, "retrieve", "risky"), (3.0, "allow", "tame")],
)
def test_first_match_wins(entropy: float, action: str, rule: str) -> None:
    d = _policy(FIRST_MATCH).decide("prompt", {"entropy": entropy})
    assert (d.action, d.rule, d.scope) == (action, rule, "prompt")
    assert d.policy_name == "t"


def test_decision_fields() -> None:
    policy = _policy(FIRST_MATCH, 'abstain_message: "default msg"\n')
    d = policy.decide("prompt", {"entropy": 6.0})
    assert isinstance(d, Decision)
    assert d.message == "too risky" and d.blocking
    assert d.thresholds == {"entropy.gt": 5.0}
    assert d.params == {}
    r = policy.decide("prompt", {"entropy": 4.0})
    assert r.params == {"k": 7} and r.message is None and not r.blocking
    assert r.to_dict()["params"] == {"k": 7}
    with pytest.raises(AttributeError):
        d.action = "allow"  # type: ignore[misc]


def test_abstain_message_default_and_override() -> None:
    policy = _policy(
        "  - {name: a, scope: prompt, when: {entropy: {gt: 1}}, action: abstain}\n",
        "abstain_message: sorry\n",
    )
    assert policy.decide("prompt", {"entropy": 2}).message == "sorry"


def test_scope_isolation() -> None:
    policy = _policy(FIRST_MATCH)
    d = policy.decide("answer", {"entropy": 9.0, "loglik": -1.0})
    assert d.rule is None and d.action == "allow"
    with pytest.raises(ValueError, match="unknown scope"):
        policy.decide("output", {"entropy": 1.0})  # type: ignore[arg-type]


ALL_ANY = """
  - name: combo
    scope: answer
    when:
      all:
        - entropy: {gt: 2}
        - any:
            - loglik: {lt: -50}
            - loglik: {gt: 10}
    action: reject_answer
    max_regenerations: 3
"""


@pytest.mark.parametrize(
    ("entropy", "loglik", "matched"),
    [(3, -60, True), (3, 20, True), (3, 0, False), (1, -60, False), (2, -60, False)],
)
def test_all_any_nesting(entropy: float, loglik: float, matched: bool) -> None:
    d = _policy(ALL_ANY).decide("answer", {"entropy": entropy, "loglik": loglik})
    assert (d.rule == "combo") is matched
    if matched:
        assert d.params == {"max_regenerations": 3}
        assert d.thresholds == {
            "all[0].entropy.gt": 2.0,
            "all[1].any[0].loglik.lt": -50.0,
            "all[1].any[1].loglik.gt": 10.0,
        }


def test_band_and_inclusive_bounds() -> None:
    policy = _policy(
        "  - {name: band, scope: prompt, when: {entropy: {ge: 1, lt: 2}}, action: log_only}\n"
    )
    assert policy.decide("prompt", {"entropy": 1.0}).rule == "band"
    assert policy.decide("prompt", {"entropy": 1.999}).rule == "band"
    assert policy.decide("prompt", {"entropy": 2.0}).rule is None
    assert policy.decide("prompt", {"entropy": 0.999}).rule is None


def test_infinite_scores_compare() -> None:
    policy = _policy(
        "  - {name: low, scope: answer, when: {loglik: {lt: -40}}, action: reject_answer}\n"
    )
    assert policy.decide("answer", {"loglik": -math.inf}).rule == "low"
    assert policy.decide("answer", {"loglik": math.inf}).rule is None


QUANTILES = """
  - name: risky
    scope: prompt
    when: {entropy: {gt_quantile: 0.9}}
    action: abstain
  - name: unlikely
    scope: answer
    when: {loglik: {lt_quantile: 0.05}}
    action: reject_answer
  - name: raw
    scope: answer
    when: {loglik: {lt: 0}}
    action: log_only
"""


def test_quantiles_resolve_against_calibration() -> None:
    policy = _policy(QUANTILES)
    d = policy.decide("prompt", {"entropy": 90.5}, calibration=CAL)
    assert d.rule == "risky" and d.thresholds == {"entropy.gt": pytest.approx(90.0)}
    assert policy.decide("prompt", {"entropy": 89.9}, calibration=CAL).rule is None
    u = policy.decide("answer", {"loglik": -95.5}, calibration=CAL)
    assert u.rule == "unlikely" and u.thresholds == {"loglik.lt": pytest.approx(-95.0)}
    assert policy.decide("answer", {"loglik": -94.0}, calibration=CAL).rule == "raw"


def test_quantile_interpolates_and_accepts_unsorted_values() -> None:
    policy = _policy(QUANTILES)
    cal = {"entropy": [3.0, 1.0, 2.0, float("nan"), 4.0]}  # sorted finite: 1 2 3 4
    d = policy.decide("prompt", {"entropy": 10}, calibration=cal)
    assert d.thresholds["entropy.gt"] == pytest.approx(3.7)  # 0.9 * 3 = 2.7 -> 3 + 0.7


def test_quantile_without_calibration_names_the_rule() -> None:
    policy = _policy(QUANTILES)
    assert policy.requires_calibration == {"entropy", "loglik"}
    with pytest.raises(PolicyError, match=r"rule 'risky'.*no calibration was given"):
        policy.decide("prompt", {"entropy": 1.0})
    with pytest.raises(PolicyError, match=r"rule 'unlikely'.*has no 'loglik' values"):
        policy.decide("answer", {"loglik": 1.0}, calibration={"entropy": [1.0, 2.0]})
    # a scope whose rules need no calibration decides without it
    raw_only = _policy("  - {name: r, scope: answer, when: {loglik: {lt: 0}}, action: log_only}\n")
    assert raw_only.decide("answer", {"loglik": -1}).rule == "r"


def test_resolve_thresholds() -> None:
    policy = _policy(QUANTILES)
    assert policy.resolve_thresholds("risky", CAL) == {"entropy.gt": pytest.approx(90.0)}
    assert policy.resolve_thresholds("risky") == {"entropy.gt": None}
    assert policy.resolve_thresholds("raw") == {"loglik.lt": 0.0}


TAGS = """
  - name: medical-any
    scope: prompt
    tags: [medical, legal]
    when: {entropy: {gt: 1}}
    action: abstain
  - name: both
    scope: prompt
    tags: [finance, prod]
    tags_match: all
    when: {entropy: {gt: 1}}
    action: abstain
  - name: eval-runs
    scope: prompt
    run_names: ["eval-*", nightly]
    when: {entropy: {gt: 1}}
    action: log_only
  - name: tool-docs
    scope: document
    sources: [tool]
    action: flag_poisoned
"""


def test_tags_filter_any_and_all() -> None:
    policy = _policy(TAGS)
    assert policy.decide("prompt", {"entropy": 2}, tags=["legal"]).rule == "medical-any"
    assert policy.decide("prompt", {"entropy": 2}, tags=["finance"]).rule is None
    assert policy.decide("prompt", {"entropy": 2}, tags=["prod", "finance", "x"]).rule == "both"
    assert policy.decide("prompt", {"entropy": 2}).rule is None


def test_run_name_glob_filter() -> None:
    policy = _policy(TAGS)
    assert policy.decide("prompt", {"entropy": 2}, run_name="eval-42").rule == "eval-runs"
    assert policy.decide("prompt", {"entropy": 2}, run_name="nightly").rule == "eval-runs"
    assert policy.decide("prompt", {"entropy": 2}, run_name="Eval-42").rule is None
    assert policy.decide("prompt", {"entropy": 2}, run_name=None).rule is None


def test_sources_filter_and_rule_without_condition() -> None:
    policy = _policy(TAGS)
    d = policy.decide("document", {}, source="tool")
    assert d.rule == "tool-docs" and d.params == {"mode": "drop"} and d.thresholds == {}
    assert policy.decide("document", {}, source="retrieval").rule is None
    assert policy.decide("document", {}, source=None).rule is None


MISSING = """
  - name: needs-loglik
    scope: answer
    when: {loglik: {lt: -10}}
    action: reject_answer
  - name: either
    scope: answer
    when:
      any:
        - loglik: {lt: -10}
        - entropy: {gt: 5}
    action: abstain
"""


@pytest.mark.parametrize("loglik", [None, float("nan"), "absent"])
def test_missing_score_does_not_match_and_is_recorded(loglik: object) -> None:
    policy = _policy(MISSING)
    scores: dict[str, float | None] = {"entropy": 1.0}
    if loglik != "absent":
        scores["loglik"] = loglik  # type: ignore[assignment]
    d = policy.decide("answer", scores)
    assert d.rule is None and d.action == "allow"
    assert d.missing_scores == ("loglik",)
    assert "loglik" not in d.scores and d.scores == {"entropy": 1.0}


def test_missing_score_under_any_can_match_another_branch() -> None:
    d = _policy(MISSING).decide("answer", {"entropy": 9.0, "loglik": float("nan")})
    assert d.rule == "either" and d.missing_scores == ("loglik",)


def test_decide_is_fast_enough() -> None:
    import time

    policy = load_default_policy()
    cal = {"entropy": [float(i) for i in range(5000)], "pmi": [float(-i) for i in range(5000)]}
    policy.decide("prompt", {"entropy": 1.0}, calibration=cal)
    start = time.perf_counter()
    for _ in range(2000):
        policy.decide("answer", {"entropy": 1.0, "pmi": -3.0}, calibration=cal)
    per_call = (time.perf_counter() - start) / 2000
    assert per_call < 1e-3


# ---------------------------------------------------------------------------- describe
def test_describe_policy_plain_words() -> None:
    policy = _policy(QUANTILES + TAGS.replace("  - name: tool-docs", "  - name: tool-docs2"))
    text = describe_policy(policy)
    assert (
        "rule 'risky': before generation, when entropy > its 90th percentile on the calibration "
        "set (the riskiest 10 %), abstain with message" in text
    )
    assert "rule 'unlikely': after generation, when loglik < its 5th percentile" in text
    assert "the least likely 5 %" in text
    assert "reject the answer and regenerate (at most 1 time)" in text
    assert "tagged 'finance' and 'prod'" in text
    assert "in runs matching 'eval-*' or 'nightly'" in text
    assert "on documents from tool, always, flag the document as poisoned and drop it" in text
    assert text.splitlines()[-1] == "otherwise: allow the call."
    with_cal = describe_policy(policy, CAL)
    assert "(the riskiest 10 %; = 90)" in with_cal
