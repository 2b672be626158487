"""The uncertainty baselines that `ssd-guard evaluate` compares SSD against.

Evaluation-only (the guard never imports them): teacher dispersion (:mod:`.dispersion`,
TD). Semantic entropy (SE) and the hidden-state probes (SEP, PCP) are also fitted by the
combined risk, so they live on the training side (:mod:`ssd_guard.training.semantic_entropy`,
:mod:`ssd_guard.training.probes`), with the shared per-prompt statistics
(:mod:`ssd_guard.training.stats`).
The runtime scorer lives in :mod:`ssd_guard.scoring`.
"""
