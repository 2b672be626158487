"""The report's sections: hallucination detection, answer mismatch, multiple choice, cost."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.evaluation.common import (
    Logger,
    _curve_grid,
    _device_info,
    _interval,
    _mismatch_auroc,
    _roc_points,
)
from ssd_guard.training import metrics as M
from ssd_guard.training.stats import LiveStats, Scorer, Stats
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import WorkdirData


def _hallucination_section(
    prompt_scores: dict[str, np.ndarray],
    answer_scores: dict[str, np.ndarray],
    wrong: np.ndarray,
    idx: np.ndarray,
) -> dict[str, Any]:
    """Every score against "the default answer is wrong": intervals and curves."""

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

    return {
        "positive": "default answer is wrong",
        "positive_rate": float(wrong.mean()),
        "auprc_random": float(wrong.mean()),
        "pre_generation": block(prompt_scores, "pre"),
        "post_generation": block(answer_scores, "post"),
    }


def _mismatch_section(
    ssd_sc: SSDStatsScorer,
    test: Stats,
    own_signals: dict[str, np.ndarray],
    signal: str,
    seed: int,
    idx: np.ndarray,
) -> dict[str, Any]:
    """The SSD answer signals of each prompt's own default answer against another's."""
    n = len(test)
    assert test.default_embeddings is not None
    other = M.derangement(n, seed)
    other_signals = ssd_sc.answer_signals(test, test.default_embeddings[other])
    by_signal = {
        k: _interval(_mismatch_auroc, own_signals[k], other_signals[k], idx=idx)
        for k in own_signals
    }
    ll_own, ll_other = own_signals[signal], other_signals[signal]
    return {
        "description": f"SSD answer signal ({signal}) of the prompt's own default answer vs "
        "the default answer of another test prompt (a seeded derangement); AUROC of minus "
        "the signal for detecting the foreign answer",
        "signal": signal,
        "auroc": by_signal[signal],
        "by_signal": by_signal,
        "pairwise_accuracy": float(np.mean(ll_own > ll_other)),
        "roc": _roc_points(np.r_[np.zeros(n), np.ones(n)], -np.r_[ll_own, ll_other]),
    }


def _padded(lists: Sequence[Sequence[float]], width: int) -> np.ndarray:
    """Ragged per-question choice scores as ``[N, width]``, ``-inf`` where a question has
    fewer choices."""
    arr = np.full((len(lists), width), -np.inf)
    for i, lst in enumerate(lists):
        arr[i, : len(lst)] = lst
    return arr


def _base_model_choices(
    lm: Any, texts: list[str], choices: list[list[str]], n_boot: int, idx_seed: int
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """The base model's multiple-choice baseline: summed and mean choice log-probs, the
    seconds they took, and the bootstrap indices of the section."""
    from ssd_guard.evaluation.mc import choice_logprobs

    t0 = time.perf_counter()
    lp_sum, lp_mean = choice_logprobs(lm.model, lm.tokenizer, texts, choices)
    return (
        lp_sum,
        lp_mean,
        time.perf_counter() - t0,
        M.bootstrap_indices(len(texts), n_boot, idx_seed),
    )


def _mc_section(
    arc: WorkdirData, arc_ssd: Any, lm: Any, idx_seed: int, n_boot: int, log: Logger
) -> dict[str, Any]:
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
    ssd_scores = _padded(ll, max(len(c) for c in choices))
    t_ssd = time.perf_counter() - t0
    log(f"MC: SSD ranked {len(rows)} questions in {t_ssd:.1f} s; base model log-probs ...")
    lp_sum, lp_mean, t_base, idx = _base_model_choices(lm, texts, choices, n_boot, idx_seed)
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
    per_signal = {k: _padded(lists, c_max) for k, lists in sig.items()}
    log(f"MC: SSD ranked {len(rows)} questions in {t_ssd:.1f} s; base model log-probs ...")
    lp_sum, lp_mean, t_base, idx = _base_model_choices(lm, texts, choices, n_boot, idx_seed)
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
