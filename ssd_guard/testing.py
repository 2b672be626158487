"""Test helpers: test an agent guarded by ssd-guard without loading a model.

* :class:`FakeScorer` -- a :class:`~ssd_guard.scoring.base.RiskScorer` whose scores come
  from a mapping or a function you give (deterministic, instant, records every call);
* :class:`FailingCache` -- a score cache whose backend is down, behaving as
  :class:`~ssd_guard.cache.RedisCache` does when Redis is unreachable;
* :func:`capture_decisions` -- collects the ``guard.decision`` audit events of the calls
  made inside a ``with`` block;
* :class:`ScriptedGenerator` -- a ``generate`` callable returning scripted answers.

Example::

    from ssd_guard import Guard, load_default_policy
    from ssd_guard.testing import FakeScorer, ScriptedGenerator, capture_decisions

    scorer = FakeScorer({"What is 2+2?": 0.1}, {"4": -0.5})
    guard = Guard(scorer, load_default_policy())
    with capture_decisions() as decisions:
        result = guard.run("What is 2+2?", ScriptedGenerator("4"))
    assert result.output == "4" and not result.abstained
    assert decisions.scopes == ["prompt", "answer"]  # one audited decision each
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Literal, overload

from structlog.testing import capture_logs

from ssd_guard.audit import DECISION_EVENT
from ssd_guard.cache import Items, MemoryCache, make_key, report_error
from ssd_guard.cache.base import InProcessAsync
from ssd_guard.errors import CacheUnavailableError

__all__ = [
    "CapturedDecisions",
    "FailingCache",
    "FakeScorer",
    "ScriptedGenerator",
    "capture_decisions",
]

EntropySource = Mapping[str, float] | Callable[[str], float]
"""Prompt -> entropy: a mapping on the exact prompt text, or a function."""
LoglikSource = (
    Mapping[str, float]
    | Mapping[tuple[str, str], float]
    | Mapping[str | tuple[str, str], float]
    | Callable[[str, str], float]
)
"""Answer -> loglik: a mapping on the answer (or ``(prompt, answer)``), or a function of
``(prompt, answer)``."""

#: Calibration of :class:`FakeScorer` unless given: evenly spread values, so quantile
#: thresholds (the default policy's) resolve to entropy ``q * 3`` and loglik ``-10 + q * 10``.
DEFAULT_CALIBRATION: dict[str, list[float]] = {
    "entropy": [i / 10 for i in range(31)],
    "loglik": [-10 + i / 2 for i in range(21)],
}


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


class FakeScorer:
    """A deterministic :class:`~ssd_guard.scoring.base.RiskScorer` for tests.

    *entropy* maps a prompt (the exact text the guard scores: the bare question, also
    when documents are put in the model's prompt) to its entropy, or is a function
    ``prompt -> entropy``.
    *loglik* maps an answer / document -- or a ``(prompt, answer)`` pair -- to its
    log-likelihood, or is a function ``(prompt, answer) -> loglik``. A text missing from
    a mapping gets ``default_entropy`` / ``default_loglik``; with no default the scorer
    raises :class:`LookupError` naming the text, so a test never passes on a score it did
    not choose.

    ``prompt_calls`` / ``answer_calls`` record every batch the guard asked for
    (``prompts_scored`` / ``answers_scored`` flatten them), so a test can check what was
    (not) scored, e.g. that a second call was a cache hit.
    """

    name = "fake"

    def __init__(
        self,
        entropy: EntropySource | None = None,
        loglik: LoglikSource | None = None,
        *,
        default_entropy: float | None = None,
        default_loglik: float | None = None,
        fingerprint: str = "fake-scorer",
        model_id: str = "fake/model",
        layer: int = 0,
        calibration: Mapping[str, Sequence[float]] | None = None,
        risk: bool = True,
    ) -> None:
        self._entropy = entropy if entropy is not None else {}
        #: A combined risk, as the bundled student has (the shipped policies read it):
        #: ``risk = entropy / 3`` before generation and ``-loglik / 10`` after it, both
        #: clipped to ``[0, 1]``. ``risk=False`` gives a student without a risk model, which
        #: a policy reading ``risk`` refuses (as it refuses such a real student).
        self.risk_model: Any = "fake-risk" if risk else None
        self._loglik = loglik if loglik is not None else {}
        self.default_entropy = default_entropy
        self.default_loglik = default_loglik
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.layer = layer
        source = DEFAULT_CALIBRATION if calibration is None else calibration
        self.calibration: dict[str, list[float]] = {
            k: sorted(float(v) for v in vs) for k, vs in source.items()
        }
        for key in ("pmi", "consensus"):  # one answer table serves every answer signal
            if "loglik" in self.calibration:
                self.calibration.setdefault(key, list(self.calibration["loglik"]))
        self.prompt_calls: list[list[str]] = []
        self.answer_calls: list[tuple[list[str], list[list[str]]]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ records
    @property
    def prompts_scored(self) -> list[str]:
        """Every prompt scored so far, in order."""
        return [p for batch in self.prompt_calls for p in batch]

    @property
    def answers_scored(self) -> list[str]:
        """Every answer / document scored so far, in order."""
        return [a for _, rows in self.answer_calls for row in rows for a in row]

    @property
    def calls(self) -> int:
        """How many times the scorer was called (prompt and answer batches)."""
        return len(self.prompt_calls) + len(self.answer_calls)

    def reset(self) -> None:
        """Forget the recorded calls."""
        with self._lock:
            self.prompt_calls.clear()
            self.answer_calls.clear()

    # ------------------------------------------------------------------ scores
    def entropy(self, prompt: str) -> float:
        """The entropy this scorer gives *prompt*."""
        if callable(self._entropy):
            return float(self._entropy(prompt))
        if prompt in self._entropy:
            return float(self._entropy[prompt])
        if self.default_entropy is not None:
            return float(self.default_entropy)
        raise LookupError(
            f"FakeScorer has no entropy for prompt {prompt!r}: add it to entropy= "
            f"or give default_entropy="
        )

    def loglik(self, prompt: str, answer: str) -> float:
        """The log-likelihood this scorer gives *answer* after *prompt*."""
        source = self._loglik
        if callable(source):
            return float(source(prompt, answer))
        table: Mapping[Any, float] = source
        if (prompt, answer) in table:
            return float(table[(prompt, answer)])
        if answer in table:
            return float(table[answer])
        if self.default_loglik is not None:
            return float(self.default_loglik)
        raise LookupError(
            f"FakeScorer has no loglik for answer {answer!r} (prompt {prompt!r}): add it to "
            f"loglik= or give default_loglik="
        )

    # ------------------------------------------------------------------ RiskScorer
    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        batch = list(prompts)
        with self._lock:
            self.prompt_calls.append(batch)
        return [self.entropy(p) for p in batch]

    def score_answers(
        self, prompts: Sequence[str], answers: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[float] | list[list[float]]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer entries")
        flat = all(isinstance(a, str) for a in answers)
        rows = [[a] if isinstance(a, str) else list(a) for a in answers]
        with self._lock:
            self.answer_calls.append((list(prompts), rows))
        scores = [[self.loglik(p, a) for a in row] for p, row in zip(prompts, rows, strict=True)]
        return [row[0] for row in scores] if flat else scores

    def answer_signals(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        with_risk: bool = False,
    ) -> dict[str, Any]:
        """Every answer signal, as an SSD scorer gives them. A fake has one answer table,
        so ``loglik``, ``pmi`` and ``consensus`` are the same numbers here; ``with_risk``
        adds ``risk = -loglik / 10`` (clipped to [0, 1]) when the fake has a risk model."""
        ll = self.score_answers(prompts, answers)
        out: dict[str, Any] = {"loglik": ll, "pmi": ll, "consensus": ll}
        if with_risk and self.risk_model is not None:
            out["risk"] = [
                _clip(-v / 10.0) if isinstance(v, float) else [_clip(-x / 10.0) for x in v]
                for v in ll
            ]
        return out

    def prompt_signals(self, prompts: Sequence[str]) -> dict[str, list[float]]:
        """``entropy`` and, with a risk model, ``risk = entropy / 3`` clipped to [0, 1]."""
        ent = self.score_prompts(prompts)
        out = {"entropy": ent}
        if self.risk_model is not None:
            out["risk"] = [_clip(e / 3.0) for e in ent]
        return out

    def __repr__(self) -> str:
        return f"FakeScorer(fingerprint={self.fingerprint!r}, calls={self.calls})"


class FailingCache(InProcessAsync):
    """A score cache whose backend is down, as :class:`~ssd_guard.cache.RedisCache` behaves
    while Redis is unreachable.

    ``fail_mode="closed"`` (default): every operation raises
    :class:`~ssd_guard.errors.CacheUnavailableError` (the guard blocks the call with an
    abstain decision and raises it). ``fail_mode="open"``: reads are misses and writes are
    dropped, and each failure is reported as *kind* (the guard computes the scores and puts
    ``cache_error: kind`` on the decision event).

    Set :attr:`down` to ``False`` to bring the backend back: it then works as an in-memory
    cache (a fresh, empty one, as after a restart without persistence). :attr:`calls`
    counts the operations attempted while down.
    """

    backend = "failing"

    def __init__(
        self,
        fail_mode: Literal["open", "closed"] = "closed",
        *,
        namespace: str = "ssd-guard",
        kind: str = "connection",
        message: str = "redis://fake:6379 is unreachable (connection refused)",
    ) -> None:
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"fail_mode must be 'open' or 'closed', got {fail_mode!r}")
        self.fail_mode = fail_mode
        self.namespace = namespace
        self.kind = kind
        self.message = message
        self.calls = 0
        self._down = True
        self._backend = MemoryCache(namespace=namespace)
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        if value == self._down:
            return
        self._down = bool(value)
        if not self._down:
            self._backend = MemoryCache(namespace=self.namespace)

    @property
    def healthy(self) -> bool:
        return not self._down

    def key(self, **parts: Any) -> str:
        """:func:`~ssd_guard.cache.make_key` with this cache's namespace."""
        return make_key(self.namespace, **parts)

    def _failed(self, op: str) -> None:
        """Count the failure; raise (closed) or report it (open)."""
        with self._lock:
            self.calls += 1
        if self.fail_mode == "closed":
            raise CacheUnavailableError(f"{self.message} during {op}")
        report_error(self.kind)

    # -- sync ----------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        if self._down:
            self._failed("get")
            return None
        return self._backend.get(key)

    def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        if self._down:
            self._failed("get_many")
            return [None] * len(keys)
        return list(self._backend.get_many(keys))

    def set(self, key: str, value: Mapping[str, Any], ttl_s: float | None = None) -> None:
        if self._down:
            self._failed("set")
            return
        self._backend.set(key, value, ttl_s)

    def set_many(self, items: Items, ttl_s: float | None = None) -> None:
        if self._down:
            self._failed("set_many")
            return
        self._backend.set_many(items, ttl_s)

    # -- lifecycle (the async twins: InProcessAsync) -----------------------------------
    def close(self) -> None:
        """Nothing to release."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"FailingCache(fail_mode={self.fail_mode!r}, down={self._down})"


class CapturedDecisions(Sequence[dict[str, Any]]):
    """The ``guard.decision`` events captured by :func:`capture_decisions`, in order
    (each a dict of the audit fields: ``action``, ``rule``, ``scope``, ``scores``...).
    It fills as calls are made; read it inside or after the ``with`` block."""

    def __init__(self, logs: list[MutableMapping[str, Any]]) -> None:
        self._logs = logs

    @property
    def events(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._logs if e.get("event") == DECISION_EVENT]

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        return self.events[index]

    def __len__(self) -> int:
        return len(self.events)

    @property
    def actions(self) -> list[str]:
        """The ``action`` of every decision."""
        return [str(e["action"]) for e in self.events]

    @property
    def rules(self) -> list[str | None]:
        """The ``rule`` of every decision (``None``: the policy's default action)."""
        return [e.get("rule") for e in self.events]

    @property
    def scopes(self) -> list[str]:
        """The ``scope`` of every decision (``prompt`` / ``answer`` / ``document``)."""
        return [str(e["scope"]) for e in self.events]

    @property
    def last(self) -> dict[str, Any] | None:
        """The last decision, or ``None`` when there was none."""
        events = self.events
        return events[-1] if events else None

    def where(self, **fields: Any) -> list[dict[str, Any]]:
        """The decisions whose fields equal *fields* (e.g. ``where(scope="answer")``)."""
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    def __repr__(self) -> str:
        return f"CapturedDecisions({self.actions!r})"


@contextlib.contextmanager
def capture_decisions() -> Iterator[CapturedDecisions]:
    """Capture the ``guard.decision`` audit events emitted inside the block.

    Uses :func:`structlog.testing.capture_logs` (structlog is reconfigured for the block
    and restored after; other log events are left out). Events are captured unless audit
    forwarding was switched off explicitly (``configure_audit(..., forward=False)``).
    """
    with capture_logs() as logs:
        yield CapturedDecisions(logs)


class ScriptedGenerator:
    """A ``generate`` callable for :meth:`ssd_guard.guard.Guard.run` that returns *answers*
    in order (the last one again once they run out) and records each call's prompt and
    ``temperature`` (``None``: the first generation; a regeneration after
    ``reject_answer`` gets the guard's ``regen_temperature``)."""

    def __init__(self, *answers: str) -> None:
        if not answers:
            raise ValueError("ScriptedGenerator needs at least one answer")
        self.answers = list(answers)
        self.prompts: list[str] = []
        self.temperatures: list[float | None] = []

    def __call__(self, prompt: str, *, temperature: float | None = None) -> str:
        self.prompts.append(prompt)
        self.temperatures.append(temperature)
        return self.answers[min(len(self.prompts), len(self.answers)) - 1]

    @property
    def calls(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return f"ScriptedGenerator({len(self.answers)} answers, calls={self.calls})"
