"""What a guarded call returns: :class:`GuardResult`, and :class:`RetrievedContext` (the
documents checked at document scope and what became of them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssd_guard.policy import Decision
from ssd_guard.scoring.callstats import CallStats

__all__ = ["GuardResult", "RetrievedContext", "abstained", "finish"]


@dataclass
class RetrievedContext:
    """Documents checked at document scope, and what became of them."""

    documents: list[str] = field(default_factory=list)
    """Kept: these go into the prompt."""
    quarantined: list[str] = field(default_factory=list)
    """Flagged with ``mode: quarantine``: kept aside, out of the prompt."""
    dropped: list[str] = field(default_factory=list)
    """Flagged with ``mode: drop`` (or an ``abstain`` rule): out of the prompt."""
    decisions: list[Decision] = field(default_factory=list)

    @property
    def abstain(self) -> Decision | None:
        return next((d for d in self.decisions if d.action == "abstain"), None)

    def extend(self, other: RetrievedContext) -> None:
        self.documents += other.documents
        self.quarantined += other.quarantined
        self.dropped += other.dropped
        self.decisions += other.decisions


@dataclass
class GuardResult:
    """What :meth:`Guard.run` did and what the agent gets (:attr:`output`)."""

    output: str
    """The accepted answer, or the abstention message."""
    abstained: bool
    prompt: str
    """The prompt as given."""
    final_prompt: str
    """The prompt passed to ``generate`` (with retrieved context, if any)."""
    run_id: str
    parent_run_id: str | None = None
    answer: str | None = None
    """The accepted answer text (``None`` when abstaining or not a text answer)."""
    decisions: list[Decision] = field(default_factory=list)
    """Every decision, in order (each one was audited)."""
    documents: list[str] = field(default_factory=list)
    """Documents put in the prompt."""
    quarantined: list[str] = field(default_factory=list)
    """Documents flagged as poisoned and kept aside (``mode: quarantine``)."""
    dropped: int = 0
    """How many documents were flagged and dropped."""
    rejected: list[str] = field(default_factory=list)
    """Answers discarded by ``reject_answer``."""
    generations: int = 0
    """How many times ``generate`` was called."""
    raw: Any = None
    """What ``generate`` returned for the accepted answer (e.g. an ``AIMessage``)."""
    entropy: float | None = None
    """Entropy of :attr:`prompt` (the question: documents put in the prompt are never
    scored with it), reused by the answer checks."""
    regeneration: str | None = None
    """After the last ``reject_answer``: ``sample``, ``same-settings``,
    ``skipped-deterministic``, ``skipped-no-sampling``, ``stopped-identical`` or
    ``exhausted`` (see the module doc)."""
    stats: CallStats | None = field(default=None, repr=False, compare=False)
    """What this call computed (the question's hidden state...), reused by its later
    checks (:meth:`Guard.complete`)."""

    @property
    def truncated(self) -> bool:
        """Whether a prompt of this call was cut to the encoder's ``max_tokens``."""
        return bool(self.stats is not None and self.stats.truncated)

    @property
    def decision(self) -> Decision | None:
        """The last decision: the one that settled the outcome."""
        return self.decisions[-1] if self.decisions else None

    @property
    def action(self) -> str:
        """``abstain`` when abstaining, else the last decision's action (``allow`` if none)."""
        if self.abstained:
            return "abstain"
        return self.decisions[-1].action if self.decisions else "allow"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (used as ``response_metadata["ssd_guard"]`` by integrations)."""
        last = self.decision
        return {
            "action": self.action,
            "abstained": self.abstained,
            "rule": last.rule if last else None,
            "scores": dict(last.scores) if last else {},
            "run_id": self.run_id,
            "generations": self.generations,
            "documents": len(self.documents),
            "quarantined": list(self.quarantined),
            "dropped": self.dropped,
            "rejected": list(self.rejected),
            "decisions": [d.to_dict() for d in self.decisions],
        }


def abstained(
    res: GuardResult, decision: Decision | None, default_message: str, message: str | None = None
) -> GuardResult:
    """*res*, abstaining: its output is *message*, else the decision's message, else the
    policy's abstention message (*default_message*)."""
    res.abstained = True
    res.answer = None
    res.raw = None
    res.output = message or (decision.message if decision else None) or default_message
    return res


def finish(
    res: GuardResult,
    ctx: RetrievedContext,
    default_message: str,
    *,
    abstain: Decision | None = None,
    final_prompt: str | None = None,
) -> GuardResult:
    """*res* once the pre-generation steps are done: *ctx*'s decisions and documents, the
    *final_prompt* to generate from, abstaining on *abstain*."""
    res.decisions = list(ctx.decisions)
    res.documents = list(ctx.documents)
    res.quarantined = list(ctx.quarantined)
    res.dropped = len(ctx.dropped)
    if final_prompt is not None:
        res.final_prompt = final_prompt
    if abstain is not None:
        return abstained(res, abstain, default_message)
    return res
