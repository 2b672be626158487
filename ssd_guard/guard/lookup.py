"""A check's scores, looked up through the cache: plan the entries a check needs, read
them, score the misses (one scorer call per signal, in a worker thread under the async
driver), write the new entries. A cache failure is absorbed in fail-open mode (recorded as
``cache_error``) and blocks the call in fail-closed mode (:class:`CacheBlocked`)."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ssd_guard._flow import Call, Flow
from ssd_guard.cache import collect_errors, make_key
from ssd_guard.cache.leases import LeasingCache, Poll
from ssd_guard.errors import CacheUnavailableError
from ssd_guard.guard.config import GuardBase
from ssd_guard.guard.entries import cached_answer_scores, cached_prompt_scores
from ssd_guard.guard.inputs import Check
from ssd_guard.policy.schema import ANSWER_SIGNALS, DOCUMENT_SIGNALS, PAIR_SIGNALS
from ssd_guard.scoring.callstats import CallStats, takes_stats

__all__ = ["CacheBlocked", "Lookup", "ScoreLookup", "ms"]

_log = structlog.get_logger("ssd_guard.guard")


class CacheBlocked(Exception):
    """The cache failed in fail-closed mode: the check is blocked."""

    def __init__(self, cause: CacheUnavailableError, cache_ms: float) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.cache_ms = cache_ms


@dataclass
class Lookup:
    """One scope check's cache lookup plan and results."""

    prompt: str
    items: list[str | None]
    """``None``: the prompt itself (entropy); a string: an answer / document (loglik)."""
    want_entropy: bool
    scope: str = "prompt"
    want_risk: bool = False
    """the prompt's combined risk (``pre`` variant) is needed too"""
    answer_needs: frozenset[str] = frozenset()
    """answer signals beyond the SSD ones this check needs (``risk``, pair scorers'; on
    scope ``document`` the screening signals ``relevance`` / ``instruction``)"""
    risk: float | None = None
    entropy: float | None = None
    entropy_hit: bool | None = None
    logliks: list[float] = field(default_factory=list)
    loglik_hits: list[bool] = field(default_factory=list)
    answer_scores: list[dict[str, float]] = field(default_factory=list)
    """Every answer signal of each item (``loglik`` and, from an SSD scorer, ``pmi`` and
    ``consensus``)."""
    cache_ms: float = 0.0
    scoring_ms: float = 0.0
    cache_error: str | None = None
    """Kind of the cache failure absorbed in fail-open mode (``connection``...)."""
    cache_error_detail: str | None = None
    keys: list[str] = field(default_factory=list)
    entropy_key: str | None = None
    stats: CallStats = field(default_factory=CallStats)
    """The call's statistics (the prompt's hidden state, computed once per call)."""

    @property
    def all_keys(self) -> list[str]:
        return ([self.entropy_key] if self.entropy_key else []) + self.keys

    def misses(self) -> tuple[bool, list[int]]:
        """Whether the entropy is still needed, and the items whose scores are."""
        need_entropy = self.want_entropy and self.entropy_hit is not True
        answers = [a for a in self.items if a is not None]
        missing = [i for i in range(len(answers)) if not self.loglik_hits[i]]
        return need_entropy, missing

    def apply_cached(self, cached: Sequence[Mapping[str, Any] | None]) -> None:
        """Take the valid cached entries (a prompt entry first when looked up)."""
        self.logliks = [float("nan")] * len(self.keys)
        self.loglik_hits = [False] * len(self.keys)
        self.answer_scores = [{} for _ in self.keys]
        self.take(dict(zip(self.all_keys, cached, strict=True)))

    def take(self, found: Mapping[str, Mapping[str, Any] | None]) -> None:
        """Take the valid entries among *found* (key -> cached value)."""
        if self.entropy_key and self.entropy_key in found:
            got = cached_prompt_scores(found[self.entropy_key], self.entropy_key)
            if got is not None and (not self.want_risk or "risk" in got):
                self.entropy, self.entropy_hit = got["entropy"], True
                self.risk = got.get("risk")
        for i, key in enumerate(self.keys):
            if key not in found:
                continue
            got = cached_answer_scores(found[key], key)
            if got is not None and self.answer_needs <= set(got):
                self.logliks[i], self.loglik_hits[i] = got["loglik"], True
                self.answer_scores[i] = got

    def miss_keys(self) -> list[str]:
        """The keys still to be scored (each once, in order)."""
        need_entropy, missing = self.misses()
        keys = ([self.entropy_key] if need_entropy and self.entropy_key else []) + [
            self.keys[i] for i in missing
        ]
        return list(dict.fromkeys(keys))

    def defer(self, keys: Sequence[str], deferred: bool = True) -> None:
        """Leave *keys* out of the next scoring (another worker holds their lease), or
        (*deferred* false) put them back."""
        wanted = set(keys)
        if self.entropy_key in wanted:
            self.entropy_hit = True if deferred else None
        for i, key in enumerate(self.keys):
            if key in wanted:
                self.loglik_hits[i] = deferred

    def degraded(self, kind: str, detail: str | None = None) -> None:
        """Record a cache failure absorbed in fail-open mode (first one wins)."""
        if self.cache_error is not None:
            return
        self.cache_error, self.cache_error_detail = kind, detail
        _log.warning("guard.cache.degraded", cache_error=kind, error=detail, fail_mode="open")


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _stats_kw(method: Callable[..., Any], stats: CallStats) -> dict[str, Any]:
    """``{"stats": stats}`` when the scorer *method* accepts the call's statistics."""
    try:
        takes = takes_stats(method)
    except TypeError:  # unhashable callable
        takes = False
    return {"stats": stats} if takes else {}


def _first_row(out: Sequence[Any]) -> list[float]:
    row = out[0]
    return [float(v) for v in (row if isinstance(row, Sequence) else [row])]


class ScoreLookup(GuardBase):
    """The guard's score lookup (the cache in front of the scorers)."""

    def _key(self, prompt: str, answer: str | None, salt: str | None = None) -> str:
        namespace = getattr(self.cache, "namespace", self.policy.cache.namespace)
        return make_key(
            namespace if salt is None else f"{namespace}:{salt}",
            student_fingerprint=self.scorer.fingerprint,
            model_id=self.scorer.model_id,
            layer=int(self.scorer.layer),
            prompt=prompt,
            answer=answer,
        )

    def _plan(self, check: Check, stats: CallStats | None) -> Lookup:
        """What a check looks up: the prompt's entropy unless given (a prompt check, or a
        rule of its scope that reads it) and one answer entry per item."""
        scope, entropy, needs = check.scope, check.entropy, self._needs
        want_entropy = entropy is None and (scope == "prompt" or scope in needs.entropy_scopes)
        plan = Lookup(
            prompt=check.prompt,
            items=list(check.items),
            want_entropy=want_entropy,
            scope=scope,
            want_risk=scope == "prompt" and needs.prompt_risk,
            answer_needs=(
                needs.answer
                if scope == "answer"
                else needs.document
                if scope == "document"
                else frozenset()
            ),
            stats=stats if stats is not None else CallStats(),
        )
        if entropy is not None:
            plan.entropy, plan.entropy_hit = float(entropy), True
        if want_entropy:
            plan.entropy_key = self._key(check.prompt, None)
        # Screened documents: their entries are keyed on the screener's version as well.
        salt = self._screening_salt() if scope == "document" and needs.document else None
        plan.keys = [self._key(check.prompt, a, salt) for a in plan.items if a is not None]
        return plan

    def _screening_salt(self) -> str:
        if self._screener is not None:
            return f"scr-{getattr(self._screener, 'version', 'custom')}"
        from ssd_guard.screening import default_screening_version

        return f"scr-{default_screening_version()}"

    def _cache_failed(self, exc: CacheUnavailableError, t0: float, plan: Lookup) -> None:
        if self._fail_mode == "closed":
            raise CacheBlocked(exc, ms(t0)) from exc
        plan.degraded("unavailable", str(exc))

    def _compute(self, plan: Lookup) -> dict[str, dict[str, float]]:
        """Score the misses (one scorer call per signal); returns the new cache entries."""
        need_entropy, missing = plan.misses()
        answers = [a for a in plan.items if a is not None]
        new: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        scorer, stats = self.scorer, plan.stats
        if need_entropy:
            prompt_fn = getattr(scorer, "prompt_signals", None)
            entry: dict[str, float]
            if plan.want_risk and callable(prompt_fn):
                got = prompt_fn([plan.prompt], **_stats_kw(prompt_fn, stats))
                entry = {k: float(v[0]) for k, v in got.items() if k in ("entropy", "risk")}
            else:
                kw = _stats_kw(scorer.score_prompts, stats)
                entry = {"entropy": float(scorer.score_prompts([plan.prompt], **kw)[0])}
            plan.entropy, plan.risk = entry["entropy"], entry.get("risk")
            plan.entropy_hit = False
            assert plan.entropy_key is not None
            if all(math.isfinite(v) for v in entry.values()):  # only finite scores are cached
                new[plan.entropy_key] = entry
        if len(plan.answer_scores) != len(plan.keys):
            plan.answer_scores = [{} for _ in plan.keys]
        if missing:
            texts = [[answers[i] for i in missing]]
            signals_fn = getattr(scorer, "answer_signals", None)
            if callable(signals_fn):
                # One pass gives every answer signal (loglik, pmi, consensus; risk).
                kw = _stats_kw(signals_fn, stats)
                if "risk" in plan.answer_needs:
                    kw["with_risk"] = True
                out_all = signals_fn([plan.prompt], texts, **kw)
                keep = (*ANSWER_SIGNALS, "risk")
                rows = {k: _first_row(v) for k, v in out_all.items() if k in keep}
            else:
                kw = _stats_kw(scorer.score_answers, stats)
                rows = {"loglik": _first_row(scorer.score_answers([plan.prompt], texts, **kw))}
            for sig in sorted(plan.answer_needs & set(PAIR_SIGNALS)):
                # Post-generation scorers beside the student (SemGrad, draft models...).
                pairs = self.pair_scorers[sig].score_pairs([plan.prompt] * len(texts[0]), texts[0])
                rows[sig] = [float(v) for v in pairs]
            screening = [s for s in DOCUMENT_SIGNALS if s in plan.answer_needs]
            if plan.scope == "document" and screening:
                # Relevance to the question / instruction-likeness, one batched pass.
                got = self.screener.score(plan.prompt, texts[0], signals=screening)
                rows.update({k: [float(v) for v in vals] for k, vals in got.items()})
            for n, i in enumerate(missing):
                entry = {k: float(v[n]) for k, v in rows.items()}
                plan.logliks[i] = entry["loglik"]
                plan.answer_scores[i] = entry
                if all(math.isfinite(v) for v in entry.values()):
                    new[plan.keys[i]] = entry
        plan.scoring_ms += ms(t0)
        return new

    def _lookup_flow(self, plan: Lookup) -> Flow[Lookup]:
        """A check's cache lookup, written once: read the entries, claim the misses when
        the cache has leases (single flight), score the ones this worker got (in a worker
        thread under the async driver, so the event loop is never blocked by the model)
        and write them, then wait for the others' and score what never came."""
        keys = plan.all_keys
        if not keys:  # every score was given (e.g. a decision made again): nothing to do
            plan.apply_cached([])
            return plan
        cache = self.cache
        cached: Sequence[Mapping[str, Any] | None] = yield from self._cache_op(
            plan, lambda: cache.get_many(keys), lambda: cache.aget_many(keys), [None] * len(keys)
        )
        plan.apply_cached(cached)
        leases, misses = self._leases(plan)
        if leases is None:
            yield from self._score_and_store(plan)
            return plan
        won, lost = yield from self._claim(plan, leases, misses)
        try:
            yield from self._score_and_store(plan)
        except Exception:
            if won:  # let the waiters score it rather than wait for the lease to expire
                yield from self._release(plan, leases, won)
            raise
        if won:
            yield from self._release(plan, leases, won)
        if lost:
            plan.defer(lost, deferred=False)
            yield from self._await_leased(plan, leases, lost)
            yield from self._score_and_store(plan)
        return plan

    def _cache_op(
        self,
        plan: Lookup,
        sync: Callable[[], Any],
        async_: Callable[[], Any],
        fallback: Any,
    ) -> Flow[Any]:
        """One cache operation: a failure is absorbed (fail open: *fallback*, recorded on
        the plan) or blocks the check (fail closed)."""
        t0 = time.perf_counter()
        out = fallback
        with collect_errors() as absorbed:
            try:
                out = yield Call(sync, async_)
            except CacheUnavailableError as exc:
                self._cache_failed(exc, t0, plan)
        if absorbed:
            plan.degraded(absorbed[0])
        plan.cache_ms += ms(t0)
        return out

    def _score_and_store(self, plan: Lookup) -> Flow[None]:
        """Score the plan's misses and write the new entries (not after a cache failure)."""
        need_entropy, missing = plan.misses()
        if not (need_entropy or missing):
            return
        compute = functools.partial(self._compute, plan)
        new: dict[str, dict[str, float]] = yield Call(
            compute, functools.partial(asyncio.to_thread, compute)
        )
        if new and plan.cache_error is None:
            cache = self.cache
            yield from self._cache_op(
                plan, lambda: cache.set_many(new), lambda: cache.aset_many(new), None
            )

    # -- single flight (see ssd_guard.cache.leases) --------------------------------------
    def _leases(self, plan: Lookup) -> tuple[LeasingCache | None, list[str]]:
        """The cache's leases and the plan's misses, when single flight applies (the
        policy's ``cache.single_flight``, a cache with leases, no cache failure yet, and
        something to score); ``(None, [])`` otherwise."""
        if not self.policy.cache.single_flight or plan.cache_error is not None:
            return None, []
        misses = plan.miss_keys()
        cache = self.cache
        if not misses or not isinstance(cache, LeasingCache):
            return None, []
        return cache, misses

    def _claim(
        self, plan: Lookup, cache: LeasingCache, misses: list[str]
    ) -> Flow[tuple[list[str], list[str]]]:
        """Claim the plan's misses: ``(won, lost)``; the lost ones are deferred."""
        ttl = self.policy.cache.lease_ttl_s
        got: list[bool] = yield from self._cache_op(
            plan,
            lambda: cache.claim_many(misses, ttl),
            lambda: cache.aclaim_many(misses, ttl),
            [True] * len(misses),
        )
        won = [k for k, g in zip(misses, got, strict=True) if g]
        lost = [k for k, g in zip(misses, got, strict=True) if not g]
        plan.defer(lost)
        return won, lost

    def _release(self, plan: Lookup, cache: LeasingCache, keys: list[str]) -> Flow[None]:
        yield from self._cache_op(
            plan, lambda: cache.release_many(keys), lambda: cache.arelease_many(keys), None
        )

    def _await_leased(self, plan: Lookup, cache: LeasingCache, keys: list[str]) -> Flow[None]:
        """Poll the keys another worker holds until each has its entry, is released
        without one, or ``lease_wait_s`` has passed; take the entries that came (the
        polls and the pauses between them count as cache time)."""
        deadline = time.perf_counter() + self.policy.cache.lease_wait_s
        pause, pending = 0.002, keys
        while pending and plan.cache_error is None:
            polled: list[Poll] = yield from self._cache_op(
                plan,
                functools.partial(cache.poll_many, pending),
                functools.partial(cache.apoll_many, pending),
                [(None, False)] * len(pending),
            )
            found = {k: v for k, (v, _) in zip(pending, polled, strict=True) if v is not None}
            plan.take(found)
            pending = [
                k for k, (v, held) in zip(pending, polled, strict=True) if v is None and held
            ]
            left = deadline - time.perf_counter()
            if pending and left <= 0:
                _log.warning(
                    "guard.cache.lease_timeout",
                    keys=len(pending),
                    lease_wait_s=self.policy.cache.lease_wait_s,
                )
                break
            if pending:
                nap = min(pause, left)
                yield Call(
                    functools.partial(time.sleep, nap), functools.partial(asyncio.sleep, nap)
                )
                plan.cache_ms += nap * 1000.0
                pause = min(2 * pause, 0.05)
