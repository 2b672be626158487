"""Fast, deterministic stand-ins for the scorer, the cache and chat models.

``FakeScorer`` implements :class:`ssd_guard.scoring.base.RiskScorer` without any model:
scores come from tables (exact text, or a substring rule) and otherwise from a hash of
the text, so they are stable across runs and processes. Every call is recorded.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ssd_guard.errors import CacheUnavailableError

__all__ = ["FailingCache", "FakeScorer", "hash_score"]


def hash_score(text: str, lo: float, hi: float) -> float:
    """A deterministic pseudo-random number in ``[lo, hi)`` derived from ``text``."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64
    return lo + (hi - lo) * unit


def _lookup(table: Mapping[str, float], contains: Mapping[str, float], text: str) -> float | None:
    if text in table:
        return table[text]
    for needle, value in contains.items():
        if needle in text:
            return value
    return None


class FakeScorer:
    """A deterministic :class:`RiskScorer`.

    * ``entropy``: exact prompt -> entropy; ``entropy_contains``: substring -> entropy
      (first match wins; useful for augmented prompts); otherwise ``default_entropy``
      or a hash of the prompt in ``[0, 3)``.
    * ``loglik``: answer text (or ``(prompt, answer)``) -> loglik; ``loglik_contains``
      substring -> loglik; otherwise ``default_loglik`` or a hash in ``[-10, 0)``.

    ``prompt_calls`` / ``answer_calls`` record every batch the guard asked for, so
    tests can assert on what was (not) computed and on the exact text the scorer saw.
    """

    name = "fake"

    def __init__(
        self,
        entropy: Mapping[str, float] | None = None,
        loglik: Mapping[str | tuple[str, str], float] | None = None,
        *,
        entropy_contains: Mapping[str, float] | None = None,
        loglik_contains: Mapping[str, float] | None = None,
        default_entropy: float | None = None,
        default_loglik: float | None = None,
        fingerprint: str = "fake0000cafe",
        model_id: str = "fake/base-model",
        layer: int = 3,
        calibration: dict[str, list[float]] | None = None,
        entropy_fn: Callable[[str], float] | None = None,
        risk: bool = True,
    ) -> None:
        self.entropy = dict(entropy or {})
        #: A combined risk, as the bundled student has (the shipped policies read it):
        #: ``risk = entropy / 3`` before generation (entropies live in ``[0, 3)``), and
        #: ``-loglik / 10`` after it. ``risk=False``: a student without a risk model.
        self.risk_model: Any = "fake-risk" if risk else None
        self.loglik = dict(loglik or {})
        self.entropy_contains = dict(entropy_contains or {})
        self.loglik_contains = dict(loglik_contains or {})
        self.default_entropy = default_entropy
        self.default_loglik = default_loglik
        self.entropy_fn = entropy_fn
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.layer = layer
        self.calibration = calibration or {
            "entropy": [i / 10 for i in range(31)],
            "loglik": [-10 + i / 2 for i in range(21)],
        }
        for key in ("pmi", "consensus"):  # one answer table serves every answer signal
            if "loglik" in self.calibration:
                self.calibration.setdefault(key, list(self.calibration["loglik"]))
        self.prompt_calls: list[list[str]] = []
        self.answer_calls: list[tuple[list[str], list[Any]]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ counters
    @property
    def prompts_scored(self) -> list[str]:
        """Every prompt text scored so far, flattened."""
        return [p for batch in self.prompt_calls for p in batch]

    @property
    def answers_scored(self) -> list[str]:
        """Every answer/document text scored so far, flattened."""
        out: list[str] = []
        for _, answers in self.answer_calls:
            for a in answers:
                out.extend([a] if isinstance(a, str) else list(a))
        return out

    @property
    def n_calls(self) -> int:
        return len(self.prompt_calls) + len(self.answer_calls)

    def reset(self) -> None:
        self.prompt_calls.clear()
        self.answer_calls.clear()

    # ------------------------------------------------------------------ scoring
    def _entropy(self, prompt: str) -> float:
        if self.entropy_fn is not None:
            return float(self.entropy_fn(prompt))
        hit = _lookup(self.entropy, self.entropy_contains, prompt)
        if hit is not None:
            return hit
        if self.default_entropy is not None:
            return self.default_entropy
        return hash_score(prompt, 0.0, 3.0)

    def _loglik(self, prompt: str, answer: str) -> float:
        if (prompt, answer) in self.loglik:
            return self.loglik[(prompt, answer)]
        if answer in self.loglik:
            return self.loglik[answer]
        for needle, value in self.loglik_contains.items():
            if needle in answer:
                return value
        if self.default_loglik is not None:
            return self.default_loglik
        return hash_score(prompt + "\x00" + answer, -10.0, 0.0)

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        with self._lock:
            self.prompt_calls.append(list(prompts))
        return [self._entropy(p) for p in prompts]

    def score_answers(
        self, prompts: Sequence[str], answers: Sequence[str] | Sequence[Sequence[str]]
    ) -> list[float] | list[list[float]]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answer entries")
        with self._lock:
            self.answer_calls.append((list(prompts), list(answers)))
        if all(isinstance(a, str) for a in answers):
            return [self._loglik(p, str(a)) for p, a in zip(prompts, answers, strict=True)]
        return [
            [self._loglik(p, a) for a in ([cands] if isinstance(cands, str) else cands)]
            for p, cands in zip(prompts, answers, strict=True)
        ]

    def prompt_signals(self, prompts: Sequence[str]) -> dict[str, list[float]]:
        """``entropy`` and (with a risk model) ``risk = entropy / 3``, clipped to [0, 1]."""
        ent = self.score_prompts(prompts)
        out = {"entropy": ent}
        if self.risk_model is not None:
            out["risk"] = [min(1.0, max(0.0, e / 3.0)) for e in ent]
        return out

    def answer_signals(
        self,
        prompts: Sequence[str],
        answers: Sequence[str] | Sequence[Sequence[str]],
        with_risk: bool = False,
    ) -> dict[str, Any]:
        """Every answer signal, as an SSD scorer gives them. A fake has one answer table,
        so ``loglik``, ``pmi`` and ``consensus`` are the same numbers here."""
        ll = self.score_answers(prompts, answers)
        out: dict[str, Any] = {"loglik": ll, "pmi": ll, "consensus": ll}
        if with_risk and self.risk_model is not None:

            def r(v: float) -> float:
                return min(1.0, max(0.0, -v / 10.0))

            out["risk"] = [r(v) if isinstance(v, float) else [r(x) for x in v] for v in ll]
        return out


class FailingCache:
    """A score cache whose backend is down: every operation raises.

    ``fail_mode`` mirrors :class:`ssd_guard.cache.RedisCache`: the guard reads it to
    decide whether to degrade to computing (``open``) or to block (``closed``).
    """

    def __init__(self, fail_mode: str = "closed", namespace: str = "ssd-guard") -> None:
        self.fail_mode = fail_mode
        self.namespace = namespace
        self.calls = 0

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise CacheUnavailableError("redis://fake:6379 is unreachable (connection refused)")

    async def _afail(self, *args: Any, **kwargs: Any) -> Any:
        return self._fail()

    get = set = get_many = set_many = _fail
    aget = aset = aget_many = aset_many = _afail

    @property
    def healthy(self) -> bool:
        return False

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


#: The fields every ``guard.decision`` audit event must carry (the issue's contract).
AUDIT_CONTRACT_FIELDS = frozenset(
    {
        "run_id",
        "parent_run_id",
        "step",
        "scope",
        "model_id",
        "hidden_state_source",
        "student_fingerprint",
        "policy_name",
        "policy_sha256",
        "scores",
        "thresholds",
        "rule",
        "action",
        "cache_hit",
        "latency_ms",
    }
)
