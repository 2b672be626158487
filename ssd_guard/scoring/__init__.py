"""The runtime scorer: protocols (:mod:`.base`), :class:`~.ssd.SSDScorer` and the
micro-batcher (:mod:`.batcher`). The evaluation-only baselines (TD, SE, SEP, PCP) live
in :mod:`ssd_guard.evaluation.baselines`."""
