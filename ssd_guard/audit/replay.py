"""What another policy would have done: :func:`replay` re-decides logged decisions from
their logged scores alone (no model is loaded)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ssd_guard.audit.reading import event_problem, restore_number
from ssd_guard.audit.writing import DECISION_EVENT

if TYPE_CHECKING:
    from ssd_guard.policy import Policy

__all__ = ["ReplayRow", "format_replay", "replay"]


@dataclass(frozen=True)
class ReplayRow:
    """One logged decision re-decided under another policy."""

    run_id: str | None
    step: int | str | None
    scope: str
    timestamp: str | None
    scores: dict[str, float]
    old_action: str
    old_rule: str | None
    new_action: str
    new_rule: str | None
    new_thresholds: dict[str, float]
    missing_scores: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return (self.old_action, self.old_rule) != (self.new_action, self.new_rule)

    @property
    def action_changed(self) -> bool:
        return self.old_action != self.new_action

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing_scores"] = list(self.missing_scores)
        d["changed"] = self.changed
        d["action_changed"] = self.action_changed
        return d


def replay(
    policy: Policy,
    events: Iterable[Mapping[str, Any]],
    calibration: Mapping[str, Sequence[float]] | None = None,
) -> list[ReplayRow]:
    """Re-decide every logged ``guard.decision`` from its logged scores under *policy*
    (no model). The logged ``tags``, ``run_name`` and ``source`` feed the rule filters.
    A policy with quantile thresholds needs *calibration* (:class:`PolicyError` otherwise).

    Malformed events (see :func:`~ssd_guard.audit.event_problem`, e.g. ``tags: 5``) and
    events of an unknown scope are left out; :func:`~ssd_guard.audit.scan_events` counts the
    malformed lines of a log."""
    rows: list[ReplayRow] = []
    for ev in events:
        if not isinstance(ev, Mapping) or ev.get("event", DECISION_EVENT) != DECISION_EVENT:
            continue
        if event_problem(ev) is not None:
            continue
        scope = ev.get("scope")
        if scope not in ("prompt", "answer", "document"):
            continue
        raw_scores = ev.get("scores") or {}
        scores: dict[str, float | None] = {}
        for metric, value in raw_scores.items():
            value = restore_number(value)
            scores[metric] = (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else None
            )
        tags = ev.get("tags") or ()
        if isinstance(tags, str):
            tags = (tags,)
        decision = policy.decide(
            scope,
            scores,
            calibration=calibration,
            tags=tuple(tags),
            run_name=ev.get("run_name"),
            source=ev.get("source"),
        )
        rows.append(
            ReplayRow(
                run_id=ev.get("run_id"),
                step=ev.get("step"),
                scope=scope,
                timestamp=ev.get("timestamp"),
                scores=dict(decision.scores),
                old_action=str(ev.get("action")),
                old_rule=ev.get("rule"),
                new_action=decision.action,
                new_rule=decision.rule,
                new_thresholds=dict(decision.thresholds),
                missing_scores=decision.missing_scores,
            )
        )
    return rows


def format_replay(
    rows: Sequence[ReplayRow], policy_name: str | None = None, *, limit: int = 50
) -> str:
    """A transition table (old action -> new action: count) and the first *limit* changed
    steps."""
    changed = [r for r in rows if r.changed]
    head = f"replayed {len(rows)} decisions"
    if policy_name:
        head += f" under policy '{policy_name}'"
    lines = [f"{head}: {len(changed)} changed ({sum(r.action_changed for r in rows)} actions)"]
    transitions = Counter((r.old_action, r.new_action) for r in rows)
    if transitions:
        lines.append("")
        lines.append("old action -> new action:")
        for (old, new), n in sorted(transitions.items(), key=lambda kv: (-kv[1], kv[0])):
            mark = "" if old == new else "   *"
            lines.append(f"  {old:>14} -> {new:<14} {n:6d}{mark}")
    if changed:
        lines.append("")
        lines.append("changed steps:")
        for r in changed[:limit]:
            scores = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r.scores.items()))
            lines.append(
                f"  run {r.run_id} step {r.step} {r.scope}: {r.old_action}"
                f" ({r.old_rule or 'default'}) -> {r.new_action} ({r.new_rule or 'default'})"
                f"  [{scores}]"
            )
        if len(changed) > limit:
            lines.append(f"  ... and {len(changed) - limit} more (--json lists them all)")
    return "\n".join(lines)
