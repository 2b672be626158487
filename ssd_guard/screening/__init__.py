"""Document screening: is a retrieved document / tool output about the question, and does
it talk to the model?

:class:`DocumentScreener` gives two signals per ``(question, document)`` pair, both from
the sentence embedder the student already uses (MiniLM; pass the loaded object so nothing
loads twice):

``relevance`` (lower is more suspicious)
    the cosine similarity between the question and the document, maximised over the whole
    document, its sentences and its windows of two consecutive sentences, so a long
    document with one relevant sentence is not penalised. A document that belongs to
    another question, or to no question, scores low.
``instruction`` (higher is more suspicious, in ``[0, 1]``)
    how much the text reads as an instruction aimed at the model: the maximum of

    * :func:`pattern_score`: weighted regular expressions for injected instructions
      (overrides of earlier instructions, role / delimiter spoofing, system-prompt and
      secret exfiltration, answer forcing, fake system notices, text hidden in comments,
      several languages), run on the text, on a de-obfuscated copy (leetspeak, spaced or
      dotted letters, zero-width characters) and on decoded base64 blobs;
    * the similarity half: the largest cosine similarity of one of the document's
      sentences to the bundled exemplar bank of injection sentences
      (``screening_exemplars.json``, written separately from the benchmark corpus), mapped
      to ``[0, 1]`` by a linear ramp: ``clip((s - sim_low) / (sim_high - sim_low), 0, 1)``
      with ``sim_low`` = :data:`SIM_LOW` (a plain sentence hardly ever reaches it) and
      ``sim_high`` = :data:`SIM_HIGH` (a paraphrase of an exemplar). Both anchors were set
      on the validation half of ``benchmarks/data/rag_corpus.json`` only.

Neither signal says whether a document's claims are *true*: an on-topic document that
states a false answer is relevant and holds no instruction (``benchmarks/screening.py``
reports how rarely it is dropped).

The embedder runs where it was loaded (CUDA when it is there, else the CPU), batched over
every unit text of a call.

Modules: :mod:`~ssd_guard.screening.patterns` (the injection pattern table),
:mod:`~ssd_guard.screening.matching` (normalising, de-obfuscating and matching text),
:mod:`~ssd_guard.screening.units` (sentences and the units that are embedded),
:mod:`~ssd_guard.screening.exemplars` (the exemplar bank, the similarity anchors and the
screening version) and :mod:`~ssd_guard.screening.screener` (:class:`DocumentScreener`).
"""

from __future__ import annotations

from ssd_guard.screening.exemplars import EXEMPLARS_FILE as EXEMPLARS_FILE
from ssd_guard.screening.exemplars import SIM_HIGH, SIM_LOW, load_exemplars
from ssd_guard.screening.exemplars import default_screening_version as default_screening_version
from ssd_guard.screening.exemplars import screening_version as screening_version
from ssd_guard.screening.matching import normalise, pattern_matches, pattern_score
from ssd_guard.screening.patterns import INJECTION_PATTERNS, InjectionPattern
from ssd_guard.screening.screener import SCREENING_SIGNALS, DocumentScreener, InstructionExplanation
from ssd_guard.screening.screener import signals_of as signals_of
from ssd_guard.screening.units import MAX_UNITS as MAX_UNITS
from ssd_guard.screening.units import split_sentences

__all__ = [
    "INJECTION_PATTERNS",
    "SCREENING_SIGNALS",
    "SIM_HIGH",
    "SIM_LOW",
    "DocumentScreener",
    "InjectionPattern",
    "InstructionExplanation",
    "load_exemplars",
    "normalise",
    "pattern_matches",
    "pattern_score",
    "split_sentences",
]
