"""Training the draft models of DraftEU (``ssd-guard distill-drafts``).

* :mod:`.recipe` — the ``distill-drafts`` recipe;
* :mod:`.train` — the resumable stages (data, teacher cache, Data-Diverse Drafts,
  Online-Stochastic-Distillation proxy, logistic regression + artifact).

The drafts' model code and artifact, read at run time by
:class:`ssd_guard.scoring.draft_eu.DraftEUScorer`, live in :mod:`ssd_guard.drafts`.
"""
