"""One combined risk: the probability that the default answer is wrong.

"Entropy alone is insufficient" (arXiv 2603.21172): an entropy combined with a correctness
probe beats either. :class:`RiskModel` is a logistic regression over the single-pass
signals the guard already has, stored beside the student as ``risk.safetensors`` and bound
to the student's fingerprint. Three variants, by what is known when the guard asks:

``pre`` (the prompt scope: before any generation)
    SSD entropy, and two linear probes on the student's own input features (no extra
    forward pass): PCP (P(the default answer is wrong)) and SEP (P(the semantic entropy
    of the model's samples is high)), each as its logit.
``post`` (the answer scope)
    ``pre`` plus the answer's SSD signals ``loglik``, ``pmi`` and ``consensus``.
``post_gen`` (the answer scope when the guard drove the generation)
    ``post`` plus the generation's own token statistics: mean and minimum token
    log-probability and mean token entropy (:mod:`ssd_guard.scoring.token_stats`), which
    a :class:`~ssd_guard.local.GuardedLocalModel` records for free.

Every input is standardised with the training split's mean and scale, then
``risk = sigmoid(coef . x + intercept)``. The probes and the regressions are fitted on the
training split only (``ssd-guard fit-risk``, :mod:`ssd_guard.training.risk_fit`); the
probes' values for the regression's own training rows are out-of-fold (stacking), so the
regression does not learn to trust in-sample probe outputs. :data:`RISK_INPUTS` are the
inputs a variant *may* read: on pooled sources the fit chooses each variant's input set
(a single input, all of them, or all but the hidden-state probes) leave-one-source-out,
and a :class:`RiskVariant` lists (and the file stores) only the inputs it was fitted on --
files whose variants read every input load unchanged. ``calibration`` holds each
variant's sorted validation-split values, so quantile thresholds work like the SSD ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssd_guard.artifact import file_in
from ssd_guard.errors import ArtifactMismatchError, ConfigError
from ssd_guard.scoring.token_stats import TOKEN_STAT_NAMES

__all__ = [
    "RISK_FILENAME",
    "RISK_INPUTS",
    "LinearProbeWeights",
    "RiskModel",
    "RiskVariant",
    "load_risk_model",
]

#: The file the risk model lives in, inside the student's artifact directory.
RISK_FILENAME = "risk.safetensors"

#: The inputs of each variant, in order.
RISK_INPUTS: dict[str, tuple[str, ...]] = {
    "pre": ("entropy", "pcp", "sep"),
    "post": ("entropy", "pcp", "sep", "loglik", "pmi", "consensus"),
    "post_gen": (
        "entropy",
        "pcp",
        "sep",
        "loglik",
        "pmi",
        "consensus",
        *TOKEN_STAT_NAMES,
    ),
}

_FORMAT = "1"


@dataclass
class LinearProbeWeights:
    """A logistic-regression probe on one slice of the student's features."""

    start: int
    stop: int
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` logits from the student's features ``[B, F]`` (any device)."""
        x = features[:, self.start : self.stop].float()
        dev = x.device
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=dev)
        coef = torch.as_tensor(self.coef, dtype=torch.float32, device=dev)
        return ((x - mean) / scale) @ coef + float(self.intercept)


@dataclass
class RiskVariant:
    """One logistic regression over named inputs (a subset of the variant's
    :data:`RISK_INPUTS`, in that order, when the fit chose fewer)."""

    inputs: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, columns: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """P(wrong) ``[B]`` from the input columns (each ``[B]``); NaN where an input is."""
        x = torch.stack([columns[name].float() for name in self.inputs], dim=-1)
        dev = x.device
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=dev)
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=dev)
        coef = torch.as_tensor(self.coef, dtype=torch.float32, device=dev)
        return torch.sigmoid(((x - mean) / scale) @ coef + float(self.intercept))


@dataclass
class RiskModel:
    """The combined risk of one student (see the module doc)."""

    student_fingerprint: str
    probes: dict[str, LinearProbeWeights]
    variants: dict[str, RiskVariant]
    calibration: dict[str, list[float]] = field(default_factory=dict)
    """``{"risk:pre" | "risk:post" | "risk:post_gen": sorted validation values}``."""
    info: dict[str, Any] = field(default_factory=dict)
    """How it was fitted: data, sizes, regularisation, validation AUROCs."""

    # ------------------------------------------------------------------ prediction
    def predict_columns(self, columns: Mapping[str, torch.Tensor], variant: str) -> torch.Tensor:
        """*variant*'s P(wrong) from named input columns; ``post_gen`` rows whose token
        statistics are missing (an empty answer) fall back to ``post``."""
        p = self.variants[variant].predict(columns)
        if variant == "post_gen" and "post" in self.variants:
            missing = torch.zeros_like(p, dtype=torch.bool)
            for name in TOKEN_STAT_NAMES:
                missing |= ~torch.isfinite(columns[name].to(p.device))
            if bool(missing.any()):
                p = torch.where(missing, self.variants["post"].predict(columns), p)
        return p

    def probe_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: p.logit(features) for name, p in self.probes.items()}

    def predict(
        self,
        features: torch.Tensor,
        entropy: torch.Tensor,
        answer_signals: Mapping[str, torch.Tensor] | None = None,
        token_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, str]:
        """``(P(wrong) [B], variant)``: ``pre`` from the prompt alone, ``post`` with the
        answer's SSD signals (``[B]`` each), ``post_gen`` when the generation's token
        statistics ``[B, 3]`` are given too (a row of NaN statistics -- no answer token --
        falls back to ``post``)."""
        cols: dict[str, torch.Tensor] = {"entropy": entropy.to(features.device).float()}
        cols.update(self.probe_logits(features))
        variant = "pre"
        if answer_signals is not None:
            for k in ("loglik", "pmi", "consensus"):
                cols[k] = torch.as_tensor(answer_signals[k]).to(features.device).float()
            variant = "post"
            if token_stats is not None and "post_gen" in self.variants:
                ts = torch.as_tensor(token_stats).to(features.device).float()
                for j, name in enumerate(TOKEN_STAT_NAMES):
                    cols[name] = ts[:, j]
                variant = "post_gen"
        return self.predict_columns(cols, variant), variant

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / RISK_FILENAME
        tensors: dict[str, torch.Tensor] = {}

        def put(key: str, value: Any) -> None:
            tensors[key] = torch.as_tensor(np.asarray(value, dtype=np.float64)).contiguous()

        slices = {}
        for name, p in self.probes.items():
            put(f"probe.{name}.mean", p.mean)
            put(f"probe.{name}.scale", p.scale)
            put(f"probe.{name}.coef", p.coef)
            put(f"probe.{name}.intercept", [p.intercept])
            slices[name] = [p.start, p.stop]
        for name, v in self.variants.items():
            put(f"variant.{name}.mean", v.mean)
            put(f"variant.{name}.scale", v.scale)
            put(f"variant.{name}.coef", v.coef)
            put(f"variant.{name}.intercept", [v.intercept])
        for key, vals in self.calibration.items():
            put(f"calibration.{key}", vals)
        meta = {
            "format": _FORMAT,
            "student_fingerprint": self.student_fingerprint,
            "probe_slices": json.dumps(slices),
            "variant_inputs": json.dumps({k: list(v.inputs) for k, v in self.variants.items()}),
            "info": json.dumps(self.info),
        }
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> RiskModel:
        """Read ``risk.safetensors`` (a file or the artifact directory); refuse it when
        *fingerprint* (the student's) is not the one it was fitted for."""
        from safetensors import safe_open

        p = file_in(path, RISK_FILENAME)
        if not p.is_file():
            raise ConfigError(
                f"no risk model at {p}: run `ssd-guard fit-risk` for this student first"
            )
        from safetensors import SafetensorError

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k).double().numpy() for k in f.keys()}  # noqa: SIM118
            if meta.get("format") != _FORMAT:
                raise ValueError(f"unsupported format {meta.get('format')!r}")
            slices = json.loads(meta["probe_slices"])
            inputs = json.loads(meta["variant_inputs"])
            info = json.loads(meta.get("info", "{}"))
            owner = str(meta["student_fingerprint"])
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
            raise ConfigError(f"{p} is not a valid risk model: {exc}") from exc
        if fingerprint is not None and owner != fingerprint:
            raise ArtifactMismatchError(
                f"{p} was fitted for the student with fingerprint {owner}, but the student in "
                f"use has fingerprint {fingerprint}: re-run `ssd-guard fit-risk` for it"
            )
        probes = {
            name: LinearProbeWeights(
                start=int(a),
                stop=int(b),
                mean=t[f"probe.{name}.mean"],
                scale=t[f"probe.{name}.scale"],
                coef=t[f"probe.{name}.coef"],
                intercept=float(t[f"probe.{name}.intercept"][0]),
            )
            for name, (a, b) in slices.items()
        }
        variants = {
            name: RiskVariant(
                inputs=tuple(cols),
                mean=t[f"variant.{name}.mean"],
                scale=t[f"variant.{name}.scale"],
                coef=t[f"variant.{name}.coef"],
                intercept=float(t[f"variant.{name}.intercept"][0]),
            )
            for name, cols in inputs.items()
        }
        calibration = {
            k.split(".", 1)[1]: sorted(float(x) for x in v)
            for k, v in t.items()
            if k.startswith("calibration.")
        }
        return cls(owner, probes, variants, calibration, info)


def load_risk_model(artifact_dir: str | Path, fingerprint: str) -> RiskModel | None:
    """The artifact's risk model, or ``None`` when it has none (refused when it belongs to
    another student)."""
    p = Path(artifact_dir) / RISK_FILENAME
    return RiskModel.load(p, fingerprint=fingerprint) if p.is_file() else None
