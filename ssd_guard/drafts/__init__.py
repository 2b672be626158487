"""Draft models for token-level epistemic uncertainty (after arXiv 2602.01956).

* :mod:`.model` — drafts built from the target (its embedding, a few of its decoder
  layers, its head), the three-segment batch layout, low-rank weight perturbations and
  the EU divergences (``EU = JSD(drafts) + KL(draft mixture || proxy)``);
* :mod:`.artifact` — the safetensors + manifest artifact and its compatibility checks.

The scorer is :class:`ssd_guard.scoring.draft_eu.DraftEUScorer`; training them (recipe,
stages) is offline: :mod:`ssd_guard.training.drafts`.
"""
