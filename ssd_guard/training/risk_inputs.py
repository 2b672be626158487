"""The combined risk's inputs: cached token statistics, the hidden-state probes, the columns."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.scoring.risk import LinearProbeWeights, RiskModel
from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES, teacher_forced_token_stats
from ssd_guard.training.probes import KnowProbe, SemanticEntropyProbe
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats import Stats
from ssd_guard.training.stats_scorers import SSDStatsScorer, features_from_stats

Logger = Callable[[str], None]
TOKEN_STATS_FILE = "token_stats.safetensors"


def workdir_token_stats(
    data: Any, model: Any, tokenizer: Any, *, chunk: int = 128, log: Logger | None = None
) -> np.ndarray:
    """``[N, 3]`` token statistics of every row's default answer (all splits), computed
    by teacher forcing and cached (resumable, chunk by chunk) in the work directory."""
    from safetensors.numpy import load_file, save_file

    say = log or (lambda m: None)
    path = Path(data.root) / TOKEN_STATS_FILE
    prompts = [str(r.get("text", r["prompt"])) for r in data.prompts]
    default = list(data.stats.default or [])
    n = len(prompts)
    digest = _token_stats_digest(prompts, default, model)
    done = np.full((n, 3), np.nan)
    have = np.zeros(n, dtype=bool)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            stored = (f.metadata() or {}).get("digest")
        if stored == digest:
            t = load_file(str(path))
            done, have = t["values"].astype(np.float64), t["done"].astype(bool)
        else:
            say(
                f"token stats: {path} was computed for other prompts, answers or another "
                "model; computing them again"
            )
    todo = np.flatnonzero(~have)
    t0 = time.perf_counter()
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        done[rows] = teacher_forced_token_stats(
            model, tokenizer, [prompts[i] for i in rows], [default[i] for i in rows]
        )
        have[rows] = True
        save_file(
            {"values": done, "done": have.astype(np.uint8)}, str(path), metadata={"digest": digest}
        )
        say(f"token stats: {int(have.sum())}/{n} rows ({time.perf_counter() - t0:.0f} s)")
    return done


def _token_stats_digest(prompts: Sequence[str], answers: Sequence[str], model: Any) -> str:
    """What the cached token statistics depend on: every row's prompt and default
    answer, and the model (its weights' fingerprint and dtype)."""
    import hashlib
    import json

    from ssd_guard.models import model_fingerprint

    try:
        who = [model_fingerprint(model), str(next(model.parameters()).dtype)]
    except (AttributeError, StopIteration, TypeError):
        who = [type(model).__name__]
    blob = json.dumps([who, list(prompts), list(answers)], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _layer_stats(stats: Stats, features: torch.Tensor, layers: Sequence[int], h: int) -> Stats:
    """A Stats whose ``hidden_layers`` are the student's feature slices (probe inputs)."""
    out = Stats(prompts=stats.prompts, samples=stats.samples)
    out.sample_embeddings = stats.sample_embeddings
    out.hidden_layers = {
        int(ly): features[:, i * h : (i + 1) * h].float() for i, ly in enumerate(layers)
    }
    return out


def _fit_probe(
    kind: str,
    train: Stats,
    y_train: np.ndarray | None,
    val: Stats,
    y_val: np.ndarray | None,
    layers: Sequence[int],
    seed: int,
) -> tuple[Any, float, float]:
    """The probe (layer and C chosen on validation), its C and validation AUROC."""
    best: tuple[float, float, Any] | None = None
    for c in (0.01, 0.05, 0.2):
        probe: Any
        if kind == "pcp":
            probe = KnowProbe(candidate_layers=layers, C=c, seed=seed, name="PCP")
        else:
            se = SemanticEntropy("embedding", threshold=0.8, name="SE-cos")
            probe = SemanticEntropyProbe(
                candidate_layers=layers, entropy=se, C=c, seed=seed, name="SEP"
            )
        probe.fit(train, y_train, validation=(val, y_val))
        score = max(probe.layer_scores_.values())
        if best is None or score > best[0]:
            best = (score, c, probe)
    assert best is not None
    return best[2], best[1], best[0]


def _weights(probe: Any, layers: Sequence[int], h: int) -> LinearProbeWeights:
    i = list(layers).index(int(probe.layer_))
    return LinearProbeWeights(
        start=i * h,
        stop=(i + 1) * h,
        mean=np.asarray(probe.mean_, dtype=np.float64),
        scale=np.asarray(probe.scale_, dtype=np.float64),
        coef=np.asarray(probe.coef_, dtype=np.float64).ravel(),
        intercept=float(np.asarray(probe.intercept_).ravel()[0]),
    )


def _logit(w: LinearProbeWeights, features: torch.Tensor) -> np.ndarray:
    return np.asarray(w.logit(features).double().cpu().numpy())


def risk_inputs(
    ssd: Any,
    stats: Stats,
    probes: dict[str, LinearProbeWeights],
    token_stats: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Every input column for *stats*' rows (probe logits from the given weights)."""
    sc = SSDStatsScorer(ssd)
    feats = features_from_stats(ssd.features, stats)
    cols: dict[str, np.ndarray] = {"entropy": sc.score(stats)}
    for name, w in probes.items():
        cols[name] = _logit(w, feats)
    assert stats.default_embeddings is not None
    for k, v in sc.answer_signals(stats, stats.default_embeddings).items():
        cols[k] = np.asarray(v, dtype=np.float64)
    if token_stats is not None:
        for j, name in enumerate(TOKEN_STAT_NAMES):
            cols[name] = np.asarray(token_stats[:, j], dtype=np.float64)
    return cols


def _refit_probe(
    kind: str,
    probe: Any,
    c: float,
    sub: Stats,
    target: np.ndarray,
    layers: Sequence[int],
    h: int,
    seed: int,
) -> LinearProbeWeights:
    """*probe*'s kind, layer and ``C`` (SEP: its SE split) refitted on *sub* (targets:
    PCP the correctness labels, SEP the semantic entropies)."""
    p: Any
    if kind == "pcp":
        p = KnowProbe(int(probe.layer_), C=c, seed=seed)
    else:
        p = SemanticEntropyProbe(int(probe.layer_), threshold=probe.threshold_, C=c)
    p.fit(sub, target)
    return _weights(p, layers, h)


def predict_rows(
    model: RiskModel, variant: str, cols: dict[str, np.ndarray], features: torch.Tensor
) -> np.ndarray:
    """The variant's P(wrong) from stored columns (the probe columns are recomputed from
    *features* with the model's own probe weights)."""
    c = dict(cols)
    for name, w in model.probes.items():
        c[name] = _logit(w, features)
    tcols = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in c.items()}
    return np.asarray(model.predict_columns(tcols, variant).double().numpy())
