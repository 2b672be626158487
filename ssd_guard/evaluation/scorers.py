"""The evaluated scorers: the SSD artifact, the fitted probes, the combined risk, pair scorers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ssd_guard.evaluation.baselines.dispersion import TeacherDispersion
from ssd_guard.evaluation.common import Logger
from ssd_guard.training.probes import KnowProbe, SemanticEntropyProbe
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats import Scorer
from ssd_guard.training.stats_scorers import SSDStatsScorer
from ssd_guard.training.workdir_data import WorkdirData


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
