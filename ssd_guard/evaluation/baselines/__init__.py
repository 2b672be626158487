"""The uncertainty baselines that `ssd-guard evaluate` compares SSD against.

Evaluation-only (the guard never imports them): shared per-prompt statistics computed
once (:mod:`.stats`), teacher dispersion (:mod:`.dispersion`, TD), semantic entropy
(:mod:`.semantic_entropy`, SE) and hidden-state probes (:mod:`.probes`, SEP and PCP).
The runtime scorer lives in :mod:`ssd_guard.scoring`.
"""
