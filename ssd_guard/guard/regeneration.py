"""The generation half of a guarded call: ``generate``, check the answer, and on
``reject_answer`` regenerate (sampling when the generator can) or abstain; each event of
the rule says what happens next in ``regeneration`` (see :mod:`ssd_guard.guard`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import structlog

from ssd_guard._flow import Call, Flow
from ssd_guard.guard.context import context_field
from ssd_guard.guard.decide import Deciding
from ssd_guard.guard.inputs import CallOptions, Check, OnReject, check_meta
from ssd_guard.guard.result import GuardResult, abstained
from ssd_guard.guard.runs import bind
from ssd_guard.policy import Decision
from ssd_guard.scoring.callstats import CallStats

__all__ = ["RegenMode", "Regeneration", "accepts_temperature"]

_log = structlog.get_logger("ssd_guard.guard")

#: ``sample``: pass ``temperature=``; ``skip``: deterministic, never call again; ``fixed``:
#: the generator cannot be switched to sampling (``can_sample = False``), never call again;
#: ``own``: the generator samples by itself; ``repeat``: unknown, call again, stop on a
#: repeated answer.
RegenMode = Literal["sample", "skip", "fixed", "own", "repeat"]

#: The ``regeneration`` values after which ``generate`` is called again; after any other
#: one the ``reject_answer`` rule falls through to abstaining (its event says ``abstain``).
_REGENERATING = frozenset({"sample", "same-settings"})


def accepts_temperature(fn: Callable[..., Any]) -> bool:
    """Whether *fn* takes a ``temperature=`` keyword."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get("temperature")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )


def answer_step(
    res: GuardResult, raw: Any, extract: Callable[[Any], str | None] | None
) -> str | None:
    """Count a generation; its answer text (``None``: no text to check, e.g. a tool call)."""
    res.generations += 1
    text = extract(raw) if extract is not None else raw
    if text is None:
        res.output, res.answer, res.raw = "", None, raw
        return None
    return str(text)


def stats_of(res: GuardResult) -> CallStats:
    """*res*'s call statistics (made when missing)."""
    if res.stats is None:  # a result made by hand (e.g. from a stored agent turn)
        res.stats = CallStats()
    return res.stats


class Regeneration(Deciding):
    """The guard's generation steps: answer checks and regeneration."""

    def _regen_mode(self, generate: Callable[..., Any], deterministic: bool | None) -> RegenMode:
        """How ``reject_answer`` regenerates with *generate* (see the module doc): an
        explicit *deterministic* wins, then a ``can_sample = False`` attribute (a model
        that cannot be switched to sampling), then a ``temperature=`` keyword, then a
        ``deterministic`` attribute on *generate*."""
        if deterministic is True:
            return "skip"
        if getattr(generate, "can_sample", None) is False:
            return "fixed"
        if self.regen_temperature > 0 and accepts_temperature(generate):
            return "sample"
        if deterministic is None:
            deterministic = getattr(generate, "deterministic", None)
        if deterministic is True:
            return "skip"
        return "own" if deterministic is False else "repeat"

    def _generate_kwargs(self, mode: RegenMode, attempt: int) -> dict[str, Any]:
        if attempt > 0 and mode == "sample":
            return {"temperature": self.regen_temperature}
        return {}

    def _regeneration(
        self, d: Decision, mode: RegenMode, attempt: int, repeated: bool
    ) -> dict[str, Any]:
        """The ``regeneration`` fields of a ``reject_answer`` event: what happens next."""
        if attempt >= int(d.params.get("max_regenerations", 1)):
            return {"regeneration": "exhausted"}
        if mode == "skip":
            return {"regeneration": "skipped-deterministic"}
        if mode == "fixed":
            return {"regeneration": "skipped-no-sampling"}
        if mode == "repeat" and repeated:
            return {"regeneration": "stopped-identical"}
        if mode == "sample":
            return {"regeneration": "sample", "regen_temperature": self.regen_temperature}
        return {"regeneration": "same-settings"}

    def _on_reject(self, res: GuardResult, mode: RegenMode, attempt: int, text: str) -> OnReject:
        repeated = text in res.rejected

        def fields(d: Decision) -> tuple[Decision, dict[str, Any]]:
            out = self._regeneration(d, mode, attempt, repeated)
            res.regeneration = out["regeneration"]
            if out["regeneration"] not in _REGENERATING:
                # Nothing more is tried: the rule's outcome is the abstention, and the
                # event says so (``rule`` and ``regeneration`` say why).
                d = dataclasses.replace(d, action="abstain")
            return d, out

        return fields

    def _complete_flow(
        self, res: GuardResult, generate: Callable[..., Any], opts: CallOptions
    ) -> Flow[GuardResult]:
        """The generation steps: generate, check the answer, regenerate or accept / abstain
        (see :meth:`Guard.complete <ssd_guard.guard.Guard.complete>`). The async driver
        awaits what *generate* returns when it is awaitable."""
        if res.abstained:
            return res
        check_meta(opts.tags, opts.run_name)
        mode = self._regen_mode(generate, opts.deterministic)
        call = dataclasses.replace(opts, stats=stats_of(res))
        with bind(res.run_id, res.parent_run_id):
            attempt = 0
            while True:
                kw = self._generate_kwargs(mode, attempt)
                raw = yield Call(functools.partial(generate, res.final_prompt, **kw))
                text = answer_step(res, raw, opts.extract)
                if text is None:  # a tool call / structured output: no text to check
                    _log.info(
                        "guard.answer.unchecked",
                        run_id=res.run_id,
                        reason="no text answer (tool call or structured output)",
                        output_type=type(raw).__name__,
                    )
                    return res
                check = Check(
                    "answer",
                    res.prompt,  # the question: the student never saw the context prompt
                    [text],
                    entropy=res.entropy,
                    on_reject=self._on_reject(res, mode, attempt, text),
                    # a regeneration's event says which one it is (never a copy of the
                    # draft's event, even when the model repeated the draft)
                    extra={
                        **context_field(res.documents),
                        **({"attempt": attempt} if attempt else {}),
                    },
                )
                (d,) = yield from self._check_flow(check, call)
                res.decisions.append(d)
                if self._verdict(res, d, text, raw):
                    return res
                attempt += 1

    def _verdict(self, res: GuardResult, d: Decision, text: str, raw: Any) -> bool:
        """After an answer check: accept or abstain (``True``: done), or regenerate."""
        if d.action == "abstain":
            res.rejected.append(text)
            abstained(res, d, self.abstain_message)
            return True
        if d.action == "reject_answer":
            res.rejected.append(text)
            if res.regeneration in _REGENERATING:
                return False
            abstained(res, d, self.abstain_message)
            return True
        res.output, res.answer, res.raw = text, text, raw
        return True
