"""`ssd-guard evaluate`: every scorer against every metric, on the test split only.

:func:`run_evaluation` reads a distillation work directory, builds the scorers (SSD,
TD, SE, SEP, PCP) on one shared set of statistics, and writes ``report.md``,
``results.json`` (every number in the report, and more), ``roc.png`` and
``risk_coverage.png`` into an output directory.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ssd_guard.evaluation.baselines.dispersion import TeacherDispersion
from ssd_guard.evaluation.reference import REFERENCE
from ssd_guard.training import metrics as M
from ssd_guard.training.probes import KnowProbe, SemanticEntropyProbe
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats import LiveStats, Scorer
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import WorkdirData, load_workdir

__all__ = ["REFERENCE", "run_evaluation"]

Logger = Callable[[str], None]


def _interval(fn: Callable[..., float], *arrays: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    return M.bootstrap_ci(fn, *arrays, indices=idx).as_dict()


def _curve_grid(cov: np.ndarray, risk: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    n = cov.shape[0]
    grid = np.linspace(1.0 / n, 1.0, min(points, n))
    k = np.clip(np.ceil(grid * n - 1e-9).astype(int) - 1, 0, n - 1)
    return {"coverage": [round(float(c), 5) for c in cov[k]], "risk": [float(r) for r in risk[k]]}


def _roc_points(y: np.ndarray, s: np.ndarray, points: int = 201) -> dict[str, list[float]]:
    fpr, tpr = M.roc_curve(y, s)
    if fpr.shape[0] > points:
        k = np.unique(np.linspace(0, fpr.shape[0] - 1, points).round().astype(int))
        fpr, tpr = fpr[k], tpr[k]
    return {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}


def _mismatch_auroc(own: np.ndarray, other: np.ndarray) -> float:
    y = np.r_[np.zeros(own.shape[0]), np.ones(other.shape[0])]
    return M.auroc(y, -np.r_[own, other])


def _device_info() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _versions() -> dict[str, str]:
    import sklearn
    import transformers

    from ssd_guard._version import __version__

    return {
        "ssd_guard": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- pieces
def _load_ssd(
    data: WorkdirData,
    artifact: str | Path | None,
    lm: Any,
    embedder: Any,
    device: str | None,
    dtype: str | None,
) -> Any:
    from ssd_guard.scoring.ssd import SSDScorer

    path = Path(artifact) if artifact is not None else data.artifact_dir
    # fp32 answer embeddings: exactly what distillation embedded with.
    return SSDScorer.load(
        path, lm=lm, embedder=embedder, device=device, dtype=dtype, embedder_dtype="fp32"
    )


def _base_model_id(ssd: Any) -> str | None:
    manifest = getattr(ssd, "manifest", None)
    if manifest is not None:
        return str(manifest.base_model.id)
    mid = getattr(ssd, "model_id", None)
    return None if mid is None else str(mid)


def _lm_from_ssd(ssd: Any) -> Any:
    enc = getattr(ssd, "encoder", None)
    if enc is None:
        return None
    return SimpleNamespace(
        model=enc.model,
        tokenizer=enc.tokenizer,
        model_id=getattr(ssd, "model_id", None),
        fingerprint=getattr(ssd, "model_fingerprint", None),
    )


def _build_scorers(
    data: WorkdirData,
    ssd: Any,
    *,
    se_threshold: float,
    nli_model: str | Path | None,
    seed: int,
    log: Logger,
) -> tuple[dict[str, Scorer], dict[str, Any]]:
    """Fit the probes on train (layer chosen on validation); return scorers by name."""
    info: dict[str, Any] = {}
    se_cos = SemanticEntropy("embedding", threshold=se_threshold, name="SE-cos")
    se_str = SemanticEntropy("string", name="SE-string")
    scorers: dict[str, Scorer] = {
        "SSD": SSDStatsScorer(ssd, name="SSD"),
        "TD-std": TeacherDispersion("std", name="TD-std"),
        "TD-trace": TeacherDispersion("trace", name="TD-trace"),
        "SE-cos": se_cos,
        "SE-string": se_str,
    }
    se_main: SemanticEntropy = se_cos
    if nli_model is not None:
        se_nli = SemanticEntropy("nli", nli_model=nli_model, name="SE-NLI")
        scorers["SE-NLI"] = se_nli
        se_main = se_nli
    train, val = data.split_stats("train"), data.split_stats("validation")
    ctr, cva = data.split_correct("train"), data.split_correct("validation")
    has_val = len(val) > 0
    t0 = time.perf_counter()
    sep = SemanticEntropyProbe(entropy=se_main, seed=seed, name="SEP")
    sep.fit(train, None, validation=(val, None) if has_val else None)
    log(
        f"SEP: layer {sep.layer_}, SE threshold {sep.threshold_:.3f} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    t0 = time.perf_counter()
    pcp = KnowProbe(seed=seed, name="PCP")
    pcp.fit(train, ctr, validation=(val, cva) if has_val else None)
    log(f"PCP: layer {pcp.layer_} ({time.perf_counter() - t0:.1f} s)")
    scorers["SEP"] = sep
    scorers["PCP"] = pcp
    info["SEP"] = {
        "layer": sep.layer_,
        "se_threshold": sep.threshold_,
        "target": se_main.name,
        "train_positive_rate": sep.train_rate_,
        "layer_auroc": sep.layer_scores_,
    }
    info["PCP"] = {
        "layer": pcp.layer_,
        "train_positive_rate": pcp.train_rate_,
        "layer_auroc": pcp.layer_scores_,
    }
    return scorers, info


def _mc_section(
    arc: WorkdirData, arc_ssd: Any, lm: Any, idx_seed: int, n_boot: int, log: Logger
) -> dict[str, Any]:
    from ssd_guard.evaluation.mc import choice_logprobs

    rows = arc.split_rows("test")
    if not rows or "choices" not in rows[0]:
        raise ValueError(f"{arc.root}: not a multiple-choice work directory (no 'choices')")
    texts = [str(r.get("text", r["prompt"])) for r in rows]
    choices = [list(r["choices"]) for r in rows]
    gold = np.array([int(r["gold"]) for r in rows])
    stats = arc.split_stats("test")
    hidden = torch.from_numpy(stats.layer(int(arc_ssd.layer)))
    t0 = time.perf_counter()
    ll = arc_ssd.score_answers(texts, choices, formatted=True, hidden=hidden)
    c_max = max(len(c) for c in choices)
    ssd_scores = np.full((len(rows), c_max), -np.inf)
    for i, lst in enumerate(ll):
        ssd_scores[i, : len(lst)] = lst
    t_ssd = time.perf_counter() - t0
    log(f"MC: SSD ranked {len(rows)} questions in {t_ssd:.1f} s; base model log-probs ...")
    t0 = time.perf_counter()
    lp_sum, lp_mean = choice_logprobs(lm.model, lm.tokenizer, texts, choices)
    t_base = time.perf_counter() - t0
    idx = M.bootstrap_indices(len(rows), n_boot, idx_seed)
    n_choices = np.array([len(c) for c in choices])
    out: dict[str, Any] = {
        "workdir": str(arc.root),
        "n_test": len(rows),
        "random_baseline": float(np.mean(1.0 / n_choices)),
        "accuracy": {
            "SSD": _interval(M.mc_accuracy, ssd_scores, gold, idx=idx),
            "base-logprob-sum": _interval(M.mc_accuracy, lp_sum, gold, idx=idx),
            "base-logprob-mean": _interval(M.mc_accuracy, lp_mean, gold, idx=idx),
        },
        "agreement_ssd_vs_base_sum": float(np.mean(ssd_scores.argmax(1) == lp_sum.argmax(1))),
        "seconds": {"SSD": t_ssd, "base-logprob": t_base},
        "greedy_open_accuracy": float(arc.split_correct("test").mean()),
    }
    return out


def _mc_file_section(
    path: str | Path,
    skip: int,
    limit: int | None,
    ssd: Any,
    lm: Any,
    signal: str,
    idx_seed: int,
    n_boot: int,
    log: Logger,
) -> dict[str, Any]:
    """Multiple choice on rows ``skip .. skip + limit`` of an MC file (never trained on),
    scored with the main student's answer signals and the base model's log-probs."""
    from ssd_guard.evaluation.mc import choice_logprobs
    from ssd_guard.training.distill.data import load_open_from_mc

    rows = load_open_from_mc(path, None)[skip:]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path}: no multiple-choice rows after skipping {skip}")
    texts = [ssd.format_prompt(r.prompt) for r in rows]
    choices = [list(r.choices) for r in rows]
    gold = np.array([r.choices.index(r.answer) for r in rows])
    t0 = time.perf_counter()
    sig = ssd.answer_signals(texts, choices, formatted=True)
    t_ssd = time.perf_counter() - t0
    c_max = max(len(c) for c in choices)
    per_signal: dict[str, np.ndarray] = {}
    for k, lists in sig.items():
        arr = np.full((len(rows), c_max), -np.inf)
        for i, lst in enumerate(lists):
            arr[i, : len(lst)] = lst
        per_signal[k] = arr
    log(f"MC: SSD ranked {len(rows)} questions in {t_ssd:.1f} s; base model log-probs ...")
    t0 = time.perf_counter()
    lp_sum, lp_mean = choice_logprobs(lm.model, lm.tokenizer, texts, choices)
    t_base = time.perf_counter() - t0
    idx = M.bootstrap_indices(len(rows), n_boot, idx_seed)
    n_choices = np.array([len(c) for c in choices])
    accuracy = {
        "SSD": _interval(M.mc_accuracy, per_signal[signal], gold, idx=idx),
        **{f"SSD-{k}": _interval(M.mc_accuracy, v, gold, idx=idx) for k, v in per_signal.items()},
        "base-logprob-sum": _interval(M.mc_accuracy, lp_sum, gold, idx=idx),
        "base-logprob-mean": _interval(M.mc_accuracy, lp_mean, gold, idx=idx),
    }
    return {
        "data": str(path),
        "rows": [skip, skip + len(rows)],
        "n_test": len(rows),
        "signal": signal,
        "random_baseline": float(np.mean(1.0 / n_choices)),
        "accuracy": accuracy,
        "agreement_ssd_vs_base_sum": float(
            np.mean(per_signal[signal].argmax(1) == lp_sum.argmax(1))
        ),
        "seconds": {"SSD": t_ssd, "base-logprob": t_base},
    }


def _measure_cost(
    prompts: Sequence[str],
    defaults: Sequence[str],
    ssd: Any,
    scorers: dict[str, Scorer],
    lm: Any,
    embedder: Any,
    teacher: dict[str, Any],
    seed: int,
    log: Logger,
    pair_scorers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Per-prompt wall time of each scorer from raw text (batch of one), interleaved."""
    live = LiveStats(
        lm,
        embedder,
        n_samples=int(teacher.get("n_samples", 10)),
        temperature=float(teacher.get("temperature", 1.0)),
        default_temperature=float(teacher.get("default_temperature", 0.0)),
        max_new_tokens=int(teacher.get("max_new_tokens", 16)),
        batch_size=1,
        seed=seed,
    )
    for sc in scorers.values():
        if not isinstance(sc, SSDStatsScorer):
            sc.bind(live)
    calls: dict[str, Callable[[str, str], object]] = {
        "SSD": lambda p, d: ssd.score_prompts([p], formatted=True),
        "SSD-loglik": lambda p, d: ssd.score_answers([p], [d], formatted=True),
        "SSD-answer-signals": lambda p, d: ssd.answer_signals([p], [d], formatted=True),
    }

    if getattr(ssd, "risk_model", None) is not None:
        calls["risk"] = lambda p, d: ssd.prompt_signals([p], formatted=True)
        calls["risk-post"] = lambda p, d: ssd.answer_signals(
            [p], [d], formatted=True, with_risk=True
        )
    for ps in pair_scorers:
        calls[str(ps.name)] = functools.partial(_pair_call, ps)

    def live_call(scorer: Scorer) -> Callable[[str, str], object]:
        return lambda p, d: scorer.score_prompts([p])

    for name, sc in scorers.items():
        if name != "SSD" and not isinstance(sc, SSDStatsScorer):
            calls[name] = live_call(sc)
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():  # warm-up, untimed
            fn(prompts[0], defaults[0])
        for p, d in zip(prompts, defaults, strict=True):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn(p, d)
                times[name].append(time.perf_counter() - t0)
    base = statistics.fmean(times["SSD"])
    out: dict[str, Any] = {
        "n_prompts": len(prompts),
        "batch_size": 1,
        "n_samples": live.n_samples,
        "max_new_tokens": live.max_new_tokens,
        "device": _device_info(),
        "per_prompt_ms": {},
    }
    for name, ts in times.items():
        mean = statistics.fmean(ts)
        out["per_prompt_ms"][name] = {
            "mean": 1000 * mean,
            "median": 1000 * statistics.median(ts),
            "min": 1000 * min(ts),
            "ratio_to_ssd": mean / base if base > 0 else float("nan"),
        }
    log("cost: " + ", ".join(f"{k} {1000 * statistics.fmean(v):.0f} ms" for k, v in times.items()))
    return out


def _pair_call(ps: Any, p: str, d: str) -> object:
    # Gradient scorers need autograd inside the timed loop (which runs in inference mode).
    with torch.inference_mode(False), torch.enable_grad():
        return ps.score_pairs([p], [d], formatted=True)


def _risk_scores(
    data: WorkdirData,
    ssd: Any,
    test: Any,
    lm: Any,
    prompt_scores: dict[str, np.ndarray],
    answer_scores: dict[str, np.ndarray],
    log: Logger,
) -> dict[str, Any]:
    """The combined risk's variants on the test split (nothing without a risk model)."""
    model = getattr(ssd, "risk_model", None)
    if model is None:
        return {}
    from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES
    from ssd_guard.training.risk_fit import risk_inputs, workdir_token_stats

    token_stats = None
    if lm is not None and "post_gen" in model.variants:
        all_ts = workdir_token_stats(data, lm.model, lm.tokenizer, log=log)
        token_stats = all_ts[data.split["test"]]
    cols = risk_inputs(ssd, test, model.probes, token_stats)
    tcols = {k: torch.as_tensor(v) for k, v in cols.items()}
    for variant in model.variants:
        if variant == "post_gen" and token_stats is None:
            continue
        p = model.predict_columns(tcols, variant).double().numpy()
        if variant == "pre":
            prompt_scores["risk"] = p
        else:
            answer_scores["risk-post" if variant == "post" else "risk-post-gen"] = p
    for name in TOKEN_STAT_NAMES:
        if name in cols:
            sign = 1.0 if name == "tok_entropy_mean" else -1.0
            v = sign * cols[name]
            # An empty default answer has no token: counted as the riskiest.
            answer_scores[f"gen-{name}"] = np.where(np.isfinite(v), v, np.nanmax(v))
    return {"variants": sorted(model.variants), "info": model.info}


def student_projection(ssd: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The risk head's target space, ``(mean, components, scale)`` of the first
    ``dim`` components of the *artifact's* PCA (the one the student was trained and
    scores with; a work directory's ``pca.safetensors`` may since have been refitted),
    or ``None`` when the scorer has no PCA or no risk head."""
    risk_dim = int(getattr(ssd.heads.get("risk"), "dim_", 0)) if hasattr(ssd, "heads") else 0
    pca = getattr(getattr(ssd, "embedder", None), "pca", None)
    if pca is None or risk_dim <= 0:
        return None
    return (
        pca.mean.float().cpu().numpy(),
        pca.components[:risk_dim].float().cpu().numpy(),
        pca.scale[:risk_dim].float().cpu().numpy(),
    )


def _same_pass(a: Any, b: Any) -> bool:
    """Whether *b*'s outputs come from the very pass *a* ran (same implementation of
    ``score_pairs_all``, same model, anchor and layers)."""
    impl = getattr(type(a), "score_pairs_all", None)
    return (
        impl is not None
        and impl is getattr(type(b), "score_pairs_all", None)
        and getattr(a, "model", None) is getattr(b, "model", None)
        and all(
            getattr(a, k, None) == getattr(b, k, None)
            for k in ("position", "layers", "max_answer_tokens")
        )
    )


def _pair_scores(
    pair_scorers: Sequence[Any],
    test: Any,
    answer_scores: dict[str, np.ndarray],
    score_seconds: dict[str, float],
    log: Logger,
) -> dict[str, Any]:
    """Every pair scorer on (test prompt, default answer); one pass per scorer."""
    info: dict[str, Any] = {}
    prompts = list(test.prompts)
    answers = list(test.default or [""] * len(prompts))
    done: list[tuple[Any, dict[str, np.ndarray]]] = []
    for ps in pair_scorers:
        t0 = time.perf_counter()
        # Scorers of one pass (SemGrad and HybridGrad on one model and anchor) share it.
        shared = next((o for p2, o in done if _same_pass(p2, ps) and ps.signal in o), None)
        if shared is not None:
            out = shared
        elif hasattr(ps, "score_pairs_all"):
            with torch.inference_mode(False), torch.enable_grad():
                out = ps.score_pairs_all(prompts, answers, formatted=True)
        else:
            with torch.inference_mode(False), torch.enable_grad():
                out = {ps.signal: np.asarray(ps.score_pairs(prompts, answers, formatted=True))}
        done.append((ps, out))
        main = np.asarray(out[ps.signal], dtype=np.float64)
        secs = time.perf_counter() - t0
        n_nan = int((~np.isfinite(main)).sum())
        # An empty default answer has no score: counted as the riskiest.
        fill = np.nanmax(main) if n_nan < main.size else 0.0
        answer_scores[str(ps.name)] = np.where(np.isfinite(main), main, fill)
        score_seconds[str(ps.name)] = secs
        info[str(ps.name)] = {
            "signal": ps.signal,
            "seconds": secs,
            "outputs": sorted(out),
            "rows_without_score": n_nan,
            "shared_pass": shared is not None,
            "scorer": repr(ps),
        }
        log(f"{ps.name}: {len(prompts)} pairs in {secs:.1f} s")
    return info


# --------------------------------------------------------------------------- main
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
    def block(scores: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name, s in scores.items():
            cov, risk = M.risk_coverage(wrong, s)
            res[name] = {
                "kind": kind,
                "auroc": _interval(M.auroc, wrong, s, idx=idx),
                "auprc": _interval(M.auprc, wrong, s, idx=idx),
                "aurc": _interval(M.aurc, wrong, s, idx=idx),
                "roc": _roc_points(wrong, s),
                "risk_coverage": _curve_grid(cov, risk),
            }
        return res

    results["hallucination"] = {
        "positive": "default answer is wrong",
        "positive_rate": float(wrong.mean()),
        "auprc_random": float(wrong.mean()),
        "pre_generation": block(prompt_scores, "pre"),
        "post_generation": block(answer_scores, "post"),
    }
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
    other = M.derangement(n, seed)
    other_signals = ssd_sc.answer_signals(test, test.default_embeddings[other])
    by_signal = {
        k: _interval(_mismatch_auroc, own_signals[k], other_signals[k], idx=idx)
        for k in own_signals
    }
    ll_own, ll_other = own_signals[signal], other_signals[signal]
    results["mismatch"] = {
        "description": f"SSD answer signal ({signal}) of the prompt's own default answer vs "
        "the default answer of another test prompt (a seeded derangement); AUROC of minus "
        "the signal for detecting the foreign answer",
        "signal": signal,
        "auroc": by_signal[signal],
        "by_signal": by_signal,
        "pairwise_accuracy": float(np.mean(ll_own > ll_other)),
        "roc": _roc_points(np.r_[np.zeros(n), np.ones(n)], -np.r_[ll_own, ll_other]),
    }
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
