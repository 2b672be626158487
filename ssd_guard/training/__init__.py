"""The offline side: everything that *makes* a student and its thresholds.

Nothing in the runtime (``scoring``, ``policy``, ``cache``, ``guard``, ``audit``,
``local``, the integrations) imports this package (an import-linter contract, run by the
tests, enforces it):

* :mod:`.distill` — ``ssd-guard distill``: recipe, data loaders, the resumable stages
  (prompts, teacher samples, labels, embeddings + PCA, features, layer probes, student);
* :mod:`.drafts` — ``ssd-guard distill-drafts``: the draft models' recipe and training
  (the drafts themselves, read at run time, live in :mod:`ssd_guard.drafts`);
* :mod:`.risk_fit` — fitting the combined risk (``ssd-guard fit-risk``), over
  :mod:`.risk_inputs` (its input columns) and :mod:`.risk_select` (the LOSO selection);
* :mod:`.calibration` — Learn-then-Test threshold fitting (``ssd-guard calibrate``);
  the calibration *file* the runtime reads is :mod:`ssd_guard.calibration`;
* :mod:`.probes` (SEP / PCP hidden-state probes), :mod:`.semantic_entropy` (SE labels),
  :mod:`.stats` (per-prompt statistics of a work directory, computed once),
  :mod:`.stats_scorers`, :mod:`.workdir_data` (a work directory read for evaluation and
  fitting) and :mod:`.metrics` (AUROC, bootstrap, Spearman) — shared with
  :mod:`ssd_guard.evaluation`, which sits above this package.
"""
