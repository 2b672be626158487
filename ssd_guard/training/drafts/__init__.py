"""Training the draft models of DraftEU (``ssd-guard distill-drafts``).

* :mod:`.recipe` — the ``distill-drafts`` recipe;
* :mod:`.train` — the resumable stages' driver (``run_draft_pipeline``), over
  :mod:`.data` (data, teacher cache), :mod:`.distil` (Data-Diverse Drafts,
  Online-Stochastic-Distillation proxy) and :mod:`.aggregate` (logistic regression +
  artifact).

The drafts' model code and artifact, read at run time by
:class:`ssd_guard.scoring.draft_eu.DraftEUScorer`, live in :mod:`ssd_guard.drafts`.
"""
