"""``reject_answer`` must not regenerate with the same greedy settings
and get the identical answer. A generator with a ``temperature=`` keyword is asked to
sample at ``regen_temperature`` (default REGEN_TEMPERATURE); a deterministic one is not
called again; an unknown one is stopped when it repeats itself. Every reject_answer
event says which happened (``regeneration``)."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from ssd_guard.errors import ConfigError
from ssd_guard.guard import REGEN_TEMPERATURE, Guard
from ssd_guard.policy import Policy
from ssd_guard.testing import FakeScorer, ScriptedGenerator

POLICY = Policy.from_yaml_text(
    """
version: 1
name: regen
abstain_message: ABSTAIN
default_action: allow
rules:
  - name: unlikely
    scope: answer
    when: {loglik: {lt: -8}}
    action: reject_answer
    max_regenerations: 2
"""
)


def make_guard(**kw: Any) -> Guard:
    scorer = FakeScorer(
        default_entropy=0.2,
        loglik={"greedy answer": -9.5, "bad sample": -9.0, "good sample": -1.0},
    )
    return Guard(scorer, POLICY, **kw)


def rejects(logs: list[Any]) -> list[Any]:
    """The events of the reject_answer rule: ``reject_answer`` while it regenerates,
    ``abstain`` once it regenerates no more."""
    return [e for e in logs if e["event"] == "guard.decision" and e["rule"] == "unlikely"]


class GreedyModel:
    """Greedy at temperature 0 (the identical answer every time); samples otherwise."""

    def __init__(self, samples: list[str]) -> None:
        self.samples = list(samples)
        self.temperatures: list[float] = []

    def __call__(self, prompt: str, temperature: float = 0.0) -> str:
        self.temperatures.append(temperature)
        return "greedy answer" if temperature == 0 else self.samples.pop(0)


def test_regenerations_sample_at_the_documented_temperature() -> None:
    assert REGEN_TEMPERATURE == 1.0
    model = GreedyModel(["good sample"])
    with capture_logs() as logs:
        res = make_guard().run("q", model)
    assert res.output == "good sample" and not res.abstained
    assert model.temperatures == [0.0, REGEN_TEMPERATURE]  # first greedy, then sampled
    assert res.rejected == ["greedy answer"]
    (event,) = rejects(logs)
    assert event["regeneration"] == "sample" and event["regen_temperature"] == 1.0
    assert res.regeneration == "sample"


def test_regen_temperature_is_configurable() -> None:
    gen = ScriptedGenerator("greedy answer", "bad sample", "good sample")
    res = make_guard(regen_temperature=0.7).run("q", gen)
    assert gen.temperatures == [None, 0.7, 0.7] and res.output == "good sample"
    with pytest.raises(ConfigError, match="regen_temperature"):
        make_guard(regen_temperature=-1)


def test_sampling_generator_is_not_stopped_by_a_repeated_sample() -> None:
    gen = ScriptedGenerator("greedy answer", "greedy answer", "good sample")
    res = make_guard().run("q", gen)
    assert gen.calls == 3 and res.output == "good sample"


def test_all_samples_rejected_abstains_after_max_regenerations() -> None:
    model = GreedyModel(["bad sample", "bad sample"])
    with capture_logs() as logs:
        res = make_guard().run("q", model)
    assert res.abstained and res.output == "ABSTAIN" and len(model.temperatures) == 3
    events = rejects(logs)
    assert [e["regeneration"] for e in events] == ["sample", "sample", "exhausted"]
    # abstained after regenerating: the last event says abstain, not reject_answer
    assert [e["action"] for e in events] == ["reject_answer", "reject_answer", "abstain"]
    assert [e.get("attempt") for e in events] == [None, 1, 2]  # never two identical events


def test_deterministic_generator_is_not_called_again() -> None:
    calls: list[str] = []

    def greedy(prompt: str) -> str:
        calls.append(prompt)
        return "greedy answer"

    with capture_logs() as logs:
        res = make_guard().run("q", greedy, deterministic=True)
    assert calls == ["q"] and res.abstained and res.generations == 1
    (event,) = rejects(logs)
    assert event["regeneration"] == "skipped-deterministic" and event["action"] == "abstain"
    assert res.regeneration == "skipped-deterministic"


def test_deterministic_attribute_on_the_generator() -> None:
    class Greedy:
        deterministic = True

        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, prompt: str) -> str:
            self.calls += 1
            return "greedy answer"

    gen = Greedy()
    res = make_guard().run("q", gen)
    assert gen.calls == 1 and res.abstained and res.regeneration == "skipped-deterministic"


def test_explicit_deterministic_wins_over_a_temperature_keyword() -> None:
    gen = ScriptedGenerator("greedy answer", "good sample")
    res = make_guard().run("q", gen, deterministic=True)
    assert gen.calls == 1 and res.abstained


def test_unknown_generator_repeating_itself_is_stopped() -> None:
    gen = ScriptedGenerator("greedy answer")
    with capture_logs() as logs:
        res = make_guard(regen_temperature=0).run("q", gen)  # no sampling asked
    assert gen.temperatures == [None, None] and res.abstained
    assert [e["regeneration"] for e in rejects(logs)] == ["same-settings", "stopped-identical"]
    assert [e["action"] for e in rejects(logs)] == ["reject_answer", "abstain"]


def test_generator_that_samples_by_itself_is_called_again_as_is() -> None:
    answers = iter(["bad sample", "bad sample", "good sample"])
    res = make_guard().run("q", lambda p: next(answers), deterministic=False)
    assert res.output == "good sample" and res.generations == 3


async def test_async_generator_with_temperature_samples() -> None:
    temperatures: list[float | None] = []

    async def agen(prompt: str, *, temperature: float | None = None) -> str:
        temperatures.append(temperature)
        return "greedy answer" if temperature is None else "good sample"

    with capture_logs() as logs:
        res = await make_guard().arun("q", agen)
    assert temperatures == [None, 1.0] and res.output == "good sample"
    assert rejects(logs)[0]["regeneration"] == "sample"


async def test_async_deterministic_generator_is_not_called_again() -> None:
    calls: list[str] = []

    async def agen(prompt: str) -> str:
        calls.append(prompt)
        return "greedy answer"

    res = await make_guard().arun("q", agen, deterministic=True)
    assert calls == ["q"] and res.abstained


def test_prepare_complete_halves_regenerate_the_same_way() -> None:
    guard = make_guard()
    model = GreedyModel(["good sample"])
    res = guard.complete(guard.prepare("q"), model)
    assert model.temperatures == [0.0, 1.0] and res.output == "good sample"


class FixedModel:
    """A model the guard cannot switch to sampling (``can_sample = False``)."""

    can_sample = False

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: str, temperature: float | None = None) -> str:
        self.calls += 1
        return "greedy answer"


def test_a_model_that_cannot_sample_is_not_called_again() -> None:
    gen = FixedModel()  # even with a temperature keyword: it would repeat the draft
    with capture_logs() as logs:
        res = make_guard().run("q", gen)
    assert gen.calls == 1 and res.generations == 1
    assert res.abstained and res.output == "ABSTAIN" and res.rejected == ["greedy answer"]
    (event,) = rejects(logs)  # one event, no duplicate of the draft's
    assert event["regeneration"] == "skipped-no-sampling" and event["action"] == "abstain"
    assert res.regeneration == "skipped-no-sampling" and res.action == "abstain"
    assert [d.action for d in res.decisions] == ["allow", "abstain"]


def test_a_repeated_sample_is_checked_again_and_each_event_names_its_attempt() -> None:
    gen = ScriptedGenerator("greedy answer", "greedy answer", "good sample")
    guard = make_guard()
    with capture_logs() as logs:
        res = guard.run("q", gen)
    answers = [e for e in logs if e["event"] == "guard.decision" and e["scope"] == "answer"]
    # the repeated draft is scored and decided again (rejected), not taken as a success
    assert [e["action"] for e in answers] == ["reject_answer", "reject_answer", "allow"]
    assert [e.get("attempt") for e in answers] == [None, 1, 2]
    assert res.output == "good sample" and res.rejected == ["greedy answer"] * 2
