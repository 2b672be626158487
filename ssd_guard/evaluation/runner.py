"""`ssd-guard evaluate`: every scorer against every metric, on the test split only.

:func:`run_evaluation` reads a distillation work directory, builds the scorers (SSD,
TD, SE, SEP, PCP) on one shared set of statistics, and writes ``report.md``,
``results.json`` (every number in the report, and more), ``roc.png`` and
``risk_coverage.png`` into an output directory.

The scorers are built in :mod:`.scorers`, the sections computed in :mod:`.sections`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ssd_guard.evaluation.baselines.dispersion import TeacherDispersion
from ssd_guard.evaluation.common import Logger, _device_info, _interval, _versions
from ssd_guard.evaluation.reference import REFERENCE
from ssd_guard.evaluation.scorers import (
    _base_model_id,
    _build_scorers,
    _lm_from_ssd,
    _load_ssd,
    _pair_scores,
    _risk_scores,
    student_projection,
)
from ssd_guard.evaluation.sections import (
    _hallucination_section,
    _mc_file_section,
    _mc_section,
    _measure_cost,
    _mismatch_section,
)
from ssd_guard.training import metrics as M
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import load_workdir

__all__ = ["REFERENCE", "run_evaluation"]


def run_evaluation(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    arc_workdir: str | Path | None = None,
    mc_data: str | Path | None = None,
    mc_skip: int = 0,
    mc_limit: int | None = None,
    source: str | None = None,
    answer_signal: str | None = None,
    artifact: str | Path | None = None,
    arc_artifact: str | Path | None = None,
    cost_prompts: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    se_threshold: float = 0.8,
    nli_model: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = "auto",
    lm: Any = None,
    embedder: Any = None,
    ssd: Any = None,
    arc_ssd: Any = None,
    command: str | None = None,
    plots: bool = True,
    log: Logger | None = None,
    pair_scorers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Evaluate every scorer on the test split of ``workdir``; write the report files.

    Args:
        workdir: a work directory of ``ssd-guard distill`` (open QA recipe).
        out_dir: where ``report.md``, ``results.json``, ``roc.png``,
            ``risk_coverage.png`` and the fitted probes go.
        arc_workdir: a multiple-choice work directory (e.g. ARC-Easy) for the selection
            check; skipped when ``None``.
        mc_data, mc_skip, mc_limit: a multiple-choice JSONL file (ARC format) for the
            selection check, its rows ``mc_skip .. mc_skip + mc_limit`` (rows a pooled
            student never saw); scored with the main student.
        source: evaluate one source of a pooled work directory (every split restricted
            to it: probes train on that source's training rows).
        answer_signal: the SSD answer signal behind ``mismatch.auroc`` and the
            multiple-choice ``SSD`` entry (default: the artifact's own default).
        artifact, arc_artifact: student artifacts (default ``<workdir>/artifact``).
        cost_prompts: test prompts timed per scorer (0 skips the cost section).
        n_boot: bootstrap resamples of every interval (paired across scorers).
        seed: seeds the bootstrap, the mismatch pairing, the probes and live sampling.
        se_threshold: cosine threshold of the embedding SE.
        nli_model: local NLI model directory: adds SE-NLI (and SEP then targets it).
        lm, embedder, ssd, arc_ssd: objects already in memory (tests, notebooks);
            loaded from the artifacts when ``None``.
        command: the command line recorded in the report.
        pair_scorers: post-generation scorers of (prompt, default answer) pairs
            (:class:`~ssd_guard.scoring.base.PairScorer`: SemGrad, HybridGrad, DraftEU),
            reported under ``hallucination.post_generation`` by their ``name`` (a scorer
            with ``score_pairs_all`` reports each of its outputs from one pass) and
            timed in the cost section.
    Returns the ``results.json`` content.

    When the student has a combined risk model (``ssd-guard fit-risk``), ``risk`` is
    reported beside every single signal: its ``pre`` variant before generation, ``post``
    and ``post_gen`` (with the default answers' token statistics) after.
    """
    say: Logger = log or (lambda msg: None)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_workdir(workdir, embedder=embedder)
    if source is not None:
        keep = np.array([str(p.get("source")) == source for p in data.prompts])
        if not keep.any():
            have = sorted({str(p.get("source")) for p in data.prompts})
            raise ValueError(f"{data.root}: no rows of source {source!r}; sources: {have}")
        data.split = {k: v[keep[v]] for k, v in data.split.items()}
    if data.stats.sample_embeddings is None:
        raise ValueError(f"{data.root}: no embeddings.safetensors; run the distill stage embed")
    if ssd is None:
        ssd = _load_ssd(data, artifact, lm, embedder, device, dtype)
        say(f"loaded SSD artifact: {ssd!r}")
    if lm is None:
        lm = _lm_from_ssd(ssd)
    if embedder is None:
        embedder = getattr(getattr(ssd, "embedder", None), "model", None)

    test = data.split_stats("test")
    correct = data.split_correct("test")
    wrong = ~correct
    n = len(test)
    if n < 2:
        raise ValueError(f"{data.root}: the test split has {n} prompt(s)")
    say(f"test split: {n} prompts, greedy accuracy {correct.mean():.3f}")

    scorers, probe_info = _build_scorers(
        data, ssd, se_threshold=se_threshold, nli_model=nli_model, seed=seed, log=say
    )
    for name in ("SEP", "PCP"):
        scorers[name].save(out / "probes" / name.lower())  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ scores
    prompt_scores: dict[str, np.ndarray] = {}
    score_seconds: dict[str, float] = {}
    for name, sc in scorers.items():
        t0 = time.perf_counter()
        prompt_scores[name] = np.asarray(sc.score(test), dtype=np.float64)
        score_seconds[name] = time.perf_counter() - t0
    ssd_sc = scorers["SSD"]
    assert isinstance(ssd_sc, SSDStatsScorer)
    signal = answer_signal or str(
        getattr(
            getattr(getattr(ssd, "manifest", None), "answers", None), "default_signal", "loglik"
        )
    )
    assert test.default_embeddings is not None
    own_signals = ssd_sc.answer_signals(test, test.default_embeddings)
    answer_scores: dict[str, np.ndarray] = {f"SSD-{k}": -v for k, v in own_signals.items()}
    for key, name in (("SE-cos", "SE-cos-answer"), ("TD-std", "TD-answer")):
        a = scorers[key].score_answers(test)
        if a is not None:
            answer_scores[name] = np.asarray(a, dtype=np.float64)
    risk_info = _risk_scores(data, ssd, test, lm, prompt_scores, answer_scores, say)
    pair_info = _pair_scores(pair_scorers, test, answer_scores, score_seconds, say)

    idx = M.bootstrap_indices(n, n_boot, seed)
    results: dict[str, Any] = {
        "meta": {
            "command": command,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "workdir": str(data.root),
            "recipe": data.recipe.get("name"),
            "base_model": _base_model_id(ssd),
            "ssd_layer": int(ssd.layer),
            "ssd_features": ssd.features.describe() if hasattr(ssd, "features") else None,
            "ssd_trained_on": (getattr(getattr(ssd, "manifest", None), "training", {}) or {}).get(
                "trained_on_sources"
            ),
            "source": source,
            "answer_signal": signal,
            "n_test": n,
            "n_train": len(data.split["train"]),
            "n_validation": len(data.split["validation"]),
            "n_samples": len(test.samples[0]) if test.samples else 0,
            "greedy_accuracy_test": float(correct.mean()),
            "n_boot": n_boot,
            "seed": seed,
            "se_threshold": se_threshold,
            "nli_model": str(nli_model) if nli_model else None,
            "versions": _versions(),
            "device": _device_info(),
        },
        "reference": REFERENCE,
        "probes": probe_info,
    }
    if risk_info:
        results["risk_model"] = risk_info
    if pair_info:
        results["pair_scorers"] = pair_info

    # ------------------------------------------------------------------ hallucination
    results["hallucination"] = _hallucination_section(prompt_scores, answer_scores, wrong, idx)
    k_samples = results["meta"]["n_samples"]
    results["se_saturation"] = {
        name: float(np.mean(sc.n_classes(test) == k_samples))
        for name, sc in scorers.items()
        if isinstance(sc, SemanticEntropy) and k_samples > 1
    }
    results["selective"] = {
        "aurc_oracle": M.aurc(wrong, wrong.astype(float)),
        "aurc_random": float(wrong.mean()),
    }
    say(
        "AUROC: "
        + ", ".join(
            f"{k} {v['auroc']['value']:.3f}"
            for k, v in {
                **results["hallucination"]["pre_generation"],
                **results["hallucination"]["post_generation"],
            }.items()
        )
    )

    # ------------------------------------------------------------------ fidelity
    fidelity: dict[str, Any] = {}
    td_variants = {"TD-std": prompt_scores["TD-std"], "TD-trace": prompt_scores["TD-trace"]}
    proj = student_projection(ssd)
    if proj is not None:
        td_pca = TeacherDispersion("trace", projection=proj, name="TD-trace-pca")
        td_variants[f"TD-trace (student space, PCA {proj[1].shape[0]})"] = td_pca.score(test)
    for name, td in td_variants.items():
        fidelity[name] = _interval(M.spearman, prompt_scores["SSD"], td, idx=idx)
    results["fidelity"] = {"spearman_ssd_entropy_vs": fidelity}

    # ------------------------------------------------------------------ mismatch
    results["mismatch"] = _mismatch_section(ssd_sc, test, own_signals, signal, seed, idx)
    say(f"mismatch AUROC {results['mismatch']['auroc']['value']:.3f}")

    # ------------------------------------------------------------------ multiple choice
    if arc_workdir is not None:
        arc = load_workdir(arc_workdir)
        if arc_ssd is None:
            arc_ssd = _load_ssd(arc, arc_artifact, lm, embedder, device, dtype)
        results["multiple_choice"] = _mc_section(arc, arc_ssd, lm, seed, n_boot, say)
        acc = results["multiple_choice"]["accuracy"]
        say(
            f"MC accuracy: SSD {acc['SSD']['value']:.3f}, "
            f"base {acc['base-logprob-sum']['value']:.3f}"
        )

    if mc_data is not None:
        results["multiple_choice"] = _mc_file_section(
            mc_data, mc_skip, mc_limit, ssd, lm, signal, seed, n_boot, say
        )
        acc = results["multiple_choice"]["accuracy"]
        say(
            f"MC accuracy: SSD {acc['SSD']['value']:.3f}, "
            f"base {acc['base-logprob-sum']['value']:.3f}"
        )

    # ------------------------------------------------------------------ cost
    if cost_prompts > 0:
        if lm is None or embedder is None:
            raise ValueError("the cost section needs the base model and the embedder")
        k = min(cost_prompts, n)
        results["cost"] = _measure_cost(
            test.prompts[:k],
            (test.default or [""] * k)[:k],
            ssd,
            scorers,
            lm,
            embedder,
            data.recipe.get("teacher", {}),
            seed,
            say,
            pair_scorers=pair_scorers,
        )
    results["meta"]["offline_scoring_seconds"] = score_seconds
    results["meta"]["seconds"] = time.perf_counter() - t_start

    # ------------------------------------------------------------------ write
    from ssd_guard.evaluation.report import render_report

    if plots:
        from ssd_guard.evaluation.plots import plot_risk_coverage, plot_roc

        plot_roc(results, out / "roc.png")
        plot_risk_coverage(results, out / "risk_coverage.png")
    (out / "results.json").write_text(
        json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8"
    )
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    say(f"wrote {out / 'report.md'}")
    return results


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write NaN / inf as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj
