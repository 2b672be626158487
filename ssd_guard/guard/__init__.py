"""The framework-free guard: score -> decide -> act -> audit.

:class:`Guard` ties a :class:`~ssd_guard.scoring.base.RiskScorer`, a
:class:`~ssd_guard.policy.Policy` and a :class:`~ssd_guard.cache.ScoreCache` together:

* ``check_prompt`` / ``check_answer`` / ``check_documents`` score one scope (through the
  cache), let the policy decide, and emit exactly one ``guard.decision`` audit event per
  decision (one per document for document lists);
* ``run(prompt, generate)`` performs the actions around a generation callable:

  ``abstain``
      the policy's abstention message is returned and ``generate`` is never called;
  ``retrieve``
      the retriever is called with the question, its documents are checked against the
      question (document scope: poisoned ones are flagged), the kept ones are put in the
      prompt with :data:`DEFAULT_CONTEXT_TEMPLATE`, and the prompt decision is made again
      with retrieval done (``retrieve`` rules left out, the event says
      ``after_retrieval: true``): an ``abstain`` there abstains, anything else proceeds;
  ``reject_answer``
      the answer is discarded and ``generate`` is called again, at most
      ``max_regenerations`` times; if the last answer is still rejected the guard abstains.
      A greedy generator would only repeat the rejected answer, so a regeneration samples:
      when ``generate`` accepts a ``temperature=`` keyword it is called with
      ``temperature=regen_temperature`` (default :data:`REGEN_TEMPERATURE`, the teacher's
      sampling temperature). A generator declared deterministic (``run(...,
      deterministic=True)``, or a ``deterministic = True`` attribute on ``generate``) is not
      called again: the guard abstains at once. One declared non-deterministic
      (``deterministic=False``: it samples by itself) is called again as it is; so is any
      other generator, but the guard stops as soon as it repeats a rejected answer. A
      generator with a ``can_sample = False`` attribute (a model the integration cannot
      switch to sampling) is not called again either. Each event of the rule says what
      happens next in ``regeneration``: ``sample`` (with ``regen_temperature``) or
      ``same-settings`` (the event's action is ``reject_answer``; a regeneration's event
      carries its ``attempt``, 1, 2...), or ``skipped-deterministic``,
      ``skipped-no-sampling``, ``stopped-identical`` or ``exhausted``
      (``max_regenerations`` reached): nothing more is tried, the guard abstains and the
      event's action is ``abstain`` (its ``rule`` is the ``reject_answer`` rule). A
      regenerated answer is always checked again, also when it repeats the draft;
  ``flag_poisoned``
      the document is left out of the prompt: dropped (``mode: drop``) or kept aside in
      :attr:`GuardResult.quarantined` (``mode: quarantine``);
  ``allow`` / ``log_only``
      pass through (both are audited).

**What is scored.** The student was distilled on bare questions, so the guard scores
only those: the prompt's entropy is the question's (documents given with ``documents=``
or retrieved never enter the scored text), and documents and answers are scored against
the question's predicted answer distribution, also when the model was given the
documents. The events of such a call say how many documents were in the model's prompt
(``context_documents``).

**One prefill per call.** Each call (:meth:`Guard.run`, :meth:`Guard.prepare` +
:meth:`Guard.complete`) carries a :class:`~ssd_guard.scoring.callstats.CallStats`: the
question's hidden state is computed once, by the first check that needs it, and reused by
the document checks, the answer check and every regeneration's answer check (a scorer
that accepts ``stats=``, such as :class:`~ssd_guard.scoring.ssd.SSDScorer`). A prompt cut
to the encoder's ``max_tokens`` puts ``truncated: true`` on the call's events.

Every argument is checked: a prompt / answer that is not a ``str`` (or holds a lone
surrogate), or a single string where a list of strings is expected (``documents``,
``tags``, a retriever's result), raises :class:`~ssd_guard.errors.GuardInputError` naming
the argument. In fail-open mode a cache failure absorbed during a check is recorded on the
decision event as ``cache_error`` (``connection``, ``timeout``, ``circuit-open``...).

Every method has an ``async`` twin (``acheck_prompt``, ..., ``arun``). Each flow is
written once, as a generator that yields its effects (a cache read / write, a scorer
pass, a retriever call, a ``generate`` call) as :class:`~ssd_guard.cache.Call` objects,
the way httpx writes its auth flows once: the sync method drives it with
:func:`~ssd_guard._flow.run`, the async one with :func:`~ssd_guard._flow.arun`, where
scoring runs in a worker thread so the event loop is never blocked by the model.

Nothing here imports LangChain; :mod:`ssd_guard.integrations.langchain` builds on this.

**Layout.** :mod:`~ssd_guard.guard.core` holds the public :class:`Guard`, whose public
methods build one :class:`~ssd_guard.guard.inputs.CallOptions` from their keyword
arguments and drive a flow; the flows are written in :mod:`~ssd_guard.guard.lookup` (the
cache lookup), :mod:`~ssd_guard.guard.decide` (deciding and auditing a check),
:mod:`~ssd_guard.guard.retrieval` (the pre-generation steps) and
:mod:`~ssd_guard.guard.regeneration` (the generation steps), on the parts and
configuration of :mod:`~ssd_guard.guard.config`.
"""

from ssd_guard.guard.config import REGEN_TEMPERATURE
from ssd_guard.guard.config import AsyncRetriever as AsyncRetriever
from ssd_guard.guard.config import Retriever as Retriever
from ssd_guard.guard.context import DEFAULT_CONTEXT_TEMPLATE, format_context
from ssd_guard.guard.core import Guard
from ssd_guard.guard.decide import CACHE_BLOCK_RULE
from ssd_guard.guard.result import GuardResult, RetrievedContext
from ssd_guard.scoring.callstats import CallStats

__all__ = [
    "CACHE_BLOCK_RULE",
    "DEFAULT_CONTEXT_TEMPLATE",
    "REGEN_TEMPERATURE",
    "CallStats",
    "Guard",
    "GuardResult",
    "RetrievedContext",
    "format_context",
]
