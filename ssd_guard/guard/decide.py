"""A scope check decided and audited: look the scores up, let the policy decide, and emit
exactly one ``guard.decision`` audit event per decision (one per document for document
lists); a call blocked by a fail-closed cache is decided (``abstain``, rule
:data:`CACHE_BLOCK_RULE`), audited and raised."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ssd_guard._flow import Flow
from ssd_guard.audit import emit_decision
from ssd_guard.errors import CacheUnavailableError
from ssd_guard.guard.inputs import CallOptions, Check, check_items
from ssd_guard.guard.lookup import CacheBlocked, Lookup, ScoreLookup, ms
from ssd_guard.guard.runs import bind, current_run
from ssd_guard.policy import Decision
from ssd_guard.policy.schema import DOCUMENT_SIGNALS

__all__ = ["CACHE_BLOCK_RULE", "Deciding"]

#: The fields of a :class:`Decision` every decision event carries.
_DECISION_FIELDS = ("scope", "scores", "thresholds", "rule", "action")

#: The ``rule`` recorded when a call is blocked because the cache is down in closed mode.
CACHE_BLOCK_RULE = "cache-unavailable"


class Deciding(ScoreLookup):
    """The guard's scope checks: lookup, decision, audit event."""

    def _calibration(self, scope: str) -> dict[str, list[float]] | None:
        """The calibration values quantile thresholds read at *scope*: the student's, the
        pair scorers', and ``risk`` as the variant computed there (``pre`` before
        generation, ``post`` after; a guarded generation's ``post_gen`` values are read on
        ``post``'s scale)."""
        base = getattr(self.scorer, "calibration", None) or {}
        if not self.pair_scorers and "risk:pre" not in base:
            return base or None  # the common case: the student's values as they are
        # A shallow merge (the value lists are shared, never copied: policies treat them
        # as immutable), made per decision so a scorer's later changes are seen.
        out = dict(base)
        for ps in self.pair_scorers.values():
            out.update(ps.calibration or {})
        variant = "risk:pre" if scope == "prompt" else "risk:post"
        if variant in out:
            out["risk"] = out[variant]
        return out or None

    def _emit(
        self,
        decision: Decision,
        *,
        cache_hit: bool | None,
        latency_ms: Mapping[str, float],
        tags: Sequence[str],
        run_name: str | None,
        **extra: Any,
    ) -> None:
        run_id, parent = current_run()
        # what was decided, then the optional fields: left out when empty / None
        fields: dict[str, Any] = {k: getattr(decision, k) for k in _DECISION_FIELDS}
        lists = {
            "tags": list(tags),
            "missing_scores": list(decision.missing_scores),
            "params": dict(decision.params),
        }
        fields.update({k: v for k, v in lists.items() if v})
        named = {"run_name": run_name, "guarded_model": self.guarded_model, **extra}
        fields.update({k: v for k, v in named.items() if v is not None})
        emit_decision(
            run_id=run_id,
            parent_run_id=parent,
            step=self._steps.next(run_id),
            model_id=self.scorer.model_id,
            hidden_state_source=self.hidden_state_source,
            student_fingerprint=self.scorer.fingerprint,
            policy_name=self.policy.name,
            policy_sha256=self.policy.sha256,
            cache_hit=cache_hit,
            latency_ms=latency_ms,
            **fields,
        )

    def _decide(self, check: Check, plan: Lookup, t0: float, opts: CallOptions) -> list[Decision]:
        """One decision (and one audit event) per item of *plan*; the check's
        ``on_reject`` turns a ``reject_answer`` decision into the one recorded and adds
        fields to its event; rules whose action is in its ``skip_actions`` are left out."""
        scope, source, tags, run_name = check.scope, check.source, opts.tags, opts.run_name
        calibration = self._calibration(scope)
        n = max(1, len(plan.keys)) if scope != "prompt" else 1
        share = 1.0 / n  # a batch's cache / scoring time is shared by its documents
        before_ms = ms(t0) * share
        decisions: list[Decision] = []
        for i in range(n):
            scores: dict[str, float | None] = {}
            hits: list[bool] = []
            if plan.entropy is not None:
                scores["entropy"] = plan.entropy
                if plan.want_entropy:
                    hits.append(bool(plan.entropy_hit))
            if scope == "prompt" and plan.risk is not None:
                scores["risk"] = plan.risk
            if scope != "prompt":
                scores["loglik"] = plan.logliks[i]
                if plan.answer_scores:
                    for k, v in plan.answer_scores[i].items():
                        # (an entry shared by an answer and a document of the same text
                        # may hold screening signals: they belong to scope document)
                        if scope == "document" or k not in DOCUMENT_SIGNALS:
                            scores[k] = v
                hits.append(plan.loglik_hits[i])
            d0 = time.perf_counter()
            decision = self.policy.decide(
                scope,
                scores,
                calibration=calibration,
                tags=tags,
                run_name=run_name,
                source=source,
                skip_actions=check.skip_actions,
            )
            decide_ms = ms(d0)
            per_doc: dict[str, Any] = {}
            if scope == "document":
                per_doc = {"source": source, "doc_index": i, "batch_size": n}
            if check.on_reject is not None and decision.action == "reject_answer":
                decision, regen = check.on_reject(decision)
                per_doc.update(regen)
            if plan.stats.truncated:
                per_doc["truncated"] = True
            self._emit(
                decision,
                # None: nothing was looked up (every score was given)
                cache_hit=all(hits) if hits else None,
                latency_ms={
                    "scoring": plan.scoring_ms * share,
                    "cache": plan.cache_ms * share,
                    "decide": decide_ms,
                    "total": before_ms + decide_ms,
                },
                tags=tags,
                run_name=run_name,
                cache_error=plan.cache_error,
                cache_error_detail=plan.cache_error_detail,
                **per_doc,
                **(check.extra or {}),
            )
            decisions.append(decision)
        return decisions

    def _blocked(
        self, check: Check, exc: CacheBlocked, t0: float, opts: CallOptions
    ) -> CacheUnavailableError:
        decision = Decision(
            action="abstain",
            rule=CACHE_BLOCK_RULE,
            scope=check.scope,
            scores={},
            message=self.policy.abstain_message,
            policy_name=self.policy.name,
        )
        self._emit(
            decision,
            cache_hit=False,
            latency_ms={"scoring": 0.0, "cache": exc.cache_ms, "total": ms(t0)},
            tags=opts.tags,
            run_name=opts.run_name,
            source=check.source,
            error=str(exc.cause),
            fail_mode="closed",
        )
        err = CacheUnavailableError(
            f"call blocked: the score cache is unavailable and the policy's cache.fail_mode "
            f"is 'closed' ({exc.cause})"
        )
        err.decision = decision  # type: ignore[attr-defined]
        return err

    @contextlib.contextmanager
    def _checking(self, check: Check, opts: CallOptions) -> Iterator[tuple[Lookup, float]]:
        """The part of a check shared by the sync and async paths: check the arguments,
        bind the run, plan the cache lookup, and turn a fail-closed cache error into the
        blocking decision."""
        check_items(check, opts)
        t0 = time.perf_counter()
        with bind():
            plan = self._plan(check, opts.stats)
            try:
                yield plan, t0
            except CacheBlocked as exc:
                raise self._blocked(check, exc, t0, opts) from exc.cause

    def _check_flow(self, check: Check, opts: CallOptions) -> Flow[list[Decision]]:
        """One scope check: look the scores up (scoring the misses), decide, audit (the
        call's ``tags`` / ``run_name`` / ``stats`` from *opts*)."""
        with self._checking(check, opts) as (plan, t0):
            yield from self._lookup_flow(plan)
            return self._decide(check, plan, t0, opts)
