"""Linear probes on the prompt's hidden state: SEP and PCP.

* :class:`SemanticEntropyProbe` (SEP, Kossen et al., 2024): predicts whether the
  prompt's semantic entropy is high (SE binarised at the split that minimises the
  within-group squared error).
* :class:`KnowProbe` (PCP, "P(I know)", Kadavath et al., 2022): predicts whether the
  default answer is wrong; ``p_know`` is the complement.

Both are a standardisation plus a logistic regression (scikit-learn at fit time, plain
numpy at score time) on the last-prompt-token hidden state of one layer. The layer is
fixed, or chosen (``layer="auto"``) by AUROC on a validation set, or by 3-fold
cross-validation on the training set when no validation set is given. Probes save as
safetensors + JSON, never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ssd_guard.training.metrics import auroc
from ssd_guard.training.semantic_entropy import SemanticEntropy
from ssd_guard.training.stats import Scorer, Stats

__all__ = ["KnowProbe", "LinearProbe", "SemanticEntropyProbe", "best_split_threshold"]

_FORMAT = 1
_TENSORS = "probe.safetensors"
_META = "probe.json"


def best_split_threshold(values: np.ndarray) -> float:
    """Threshold ``t`` splitting ``values`` into ``<= t`` / ``> t`` with the least total
    within-group squared error (SEP's binarisation of semantic entropy).

    Returns a midpoint between two adjacent distinct values, or the single value when
    all values are equal.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("no values to split")
    cuts = np.nonzero(v[1:] != v[:-1])[0]  # split after index i
    if cuts.size == 0:
        return float(v[0])
    c1, c2 = np.cumsum(v), np.cumsum(v * v)
    n = v.size
    k = cuts + 1  # left group sizes
    left = c2[cuts] - c1[cuts] ** 2 / k
    rs1, rs2 = c1[-1] - c1[cuts], c2[-1] - c2[cuts]
    right = rs2 - rs1**2 / (n - k)
    best = int(cuts[np.argmin(left + right)])
    return float((v[best] + v[best + 1]) / 2.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class LinearProbe(Scorer):
    """Standardise + logistic regression on one layer's hidden state; scores P(risky).

    Args:
        layer: the hidden-state layer (``output_hidden_states`` numbering), or
            ``"auto"`` to choose among ``candidate_layers`` (default: all but 0).
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: optimiser iterations.
        seed: random state (the CV folds and the solver).
        name: reported name.

    Learned: ``layer_``, ``mean_``, ``scale_``, ``coef_``, ``intercept_``,
    ``layer_scores_`` (selection AUROC per candidate layer), ``train_rate_``.
    """

    kind: ClassVar[str] = "probe"
    default_name: ClassVar[str] = "probe"
    needs = frozenset({"hidden"})

    def __init__(
        self,
        layer: int | Literal["auto"] = "auto",
        *,
        candidate_layers: Sequence[int] | None = None,
        C: float = 0.05,
        max_iter: int = 2000,
        seed: int = 0,
        name: str | None = None,
        calculator: object | None = None,
    ) -> None:
        self.layer, self.candidate_layers = layer, candidate_layers
        self.C, self.max_iter, self.seed = C, max_iter, seed
        self.name = name or self.default_name
        self.calculator = calculator  # type: ignore[assignment]

    # ----------------------------------------------------------------- targets
    def _targets(self, stats: Stats, y: np.ndarray | None, *, fitting: bool) -> np.ndarray:
        """Binary targets, 1 = the risky outcome."""
        raise NotImplementedError

    @property
    def layers(self) -> set[int] | None:
        layer = getattr(self, "layer_", None)
        return None if layer is None else {int(layer)}

    # ----------------------------------------------------------------- fitting
    def _fit_lr(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, ...]:
        from sklearn.linear_model import LogisticRegression

        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-8, scale, 1.0)
        z = (x - mean) / scale
        if t.min() == t.max():  # one class only: a constant probe
            rate = np.clip(t.mean(), 1e-3, 1 - 1e-3)
            coef = np.zeros(x.shape[1])
            return mean, scale, coef, np.array([np.log(rate / (1 - rate))])
        lr = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        lr.fit(z, t)
        return mean, scale, lr.coef_[0].astype(np.float64), lr.intercept_.astype(np.float64)

    @staticmethod
    def _predict(x: np.ndarray, params: tuple[np.ndarray, ...]) -> np.ndarray:
        mean, scale, coef, intercept = params
        return _sigmoid(((x - mean) / scale) @ coef + intercept[0])

    def _candidates(self, stats: Stats) -> list[int]:
        if self.candidate_layers is not None:
            return [int(c) for c in self.candidate_layers]
        if stats.hidden is not None:
            return list(range(1, int(stats.hidden.shape[1])))
        return sorted(stats.hidden_layers)

    def fit(
        self,
        stats: Stats,
        y: np.ndarray | None = None,
        *,
        validation: tuple[Stats, np.ndarray | None] | None = None,
        **kwargs: Any,
    ) -> LinearProbe:
        """Fit on ``stats`` (``y`` as each probe documents); returns ``self``.

        ``validation=(stats_val, y_val)`` chooses the layer by validation AUROC when
        ``layer="auto"``.
        """
        stats.require(self.needs, self.name)
        t = self._targets(stats, y, fitting=True)
        self.train_rate_ = float(t.mean())
        if self.layer == "auto":
            scores: dict[int, float] = {}
            if validation is not None:
                vs, vy = validation
                tv = self._targets(vs, vy, fitting=False)
                for ly in self._candidates(stats):
                    params = self._fit_lr(stats.layer(ly), t)
                    scores[ly] = auroc(tv, self._predict(vs.layer(ly), params))
            else:
                rng = np.random.default_rng(self.seed)
                folds = rng.permutation(len(t)) % 3
                for ly in self._candidates(stats):
                    x = stats.layer(ly)
                    pred = np.zeros(len(t))
                    for f in range(3):
                        tr = folds != f
                        pred[~tr] = self._predict(x[~tr], self._fit_lr(x[tr], t[tr]))
                    scores[ly] = auroc(t, pred)
            finite = {k: v for k, v in scores.items() if np.isfinite(v)}
            chosen = max(finite, key=lambda k: finite[k]) if finite else min(scores)
            self.layer_scores_ = {int(k): float(v) for k, v in scores.items()}
            self.layer_ = int(chosen)
        else:
            self.layer_ = int(self.layer)
            self.layer_scores_ = {}
        self.mean_, self.scale_, self.coef_, self.intercept_ = self._fit_lr(
            stats.layer(self.layer_), t
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load() first")

    def predict_proba(self, stats: Stats) -> np.ndarray:
        """P(risky outcome) per prompt."""
        self._check_fitted()
        stats.require(self.needs, self.name)
        params = (self.mean_, self.scale_, self.coef_, self.intercept_)
        return self._predict(stats.layer(self.layer_), params)

    def score(self, stats: Stats) -> np.ndarray:
        return self.predict_proba(stats)

    # ----------------------------------------------------------------- persistence
    def _extra_meta(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, meta: dict[str, Any]) -> None:
        return None

    def save(self, directory: str | Path) -> Path:
        """Write ``probe.safetensors`` (weights) and ``probe.json`` (settings) into a directory."""
        import torch
        from safetensors.torch import save_file

        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": torch.from_numpy(np.ascontiguousarray(self.mean_, dtype=np.float64)),
            "scale": torch.from_numpy(np.ascontiguousarray(self.scale_, dtype=np.float64)),
            "coef": torch.from_numpy(np.ascontiguousarray(self.coef_, dtype=np.float64)),
            "intercept": torch.from_numpy(np.ascontiguousarray(self.intercept_, dtype=np.float64)),
        }
        save_file(tensors, str(d / _TENSORS))
        meta = {
            "format": _FORMAT,
            "kind": self.kind,
            "name": self.name,
            "layer": self.layer_,
            "C": self.C,
            "max_iter": self.max_iter,
            "seed": self.seed,
            "train_rate": self.train_rate_,
            "layer_scores": {str(k): v for k, v in self.layer_scores_.items()},
            **self._extra_meta(),
        }
        (d / _META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> LinearProbe:
        """Load a saved probe; ``LinearProbe.load`` returns the right subclass."""
        from safetensors.torch import load_file

        d = Path(directory)
        meta = json.loads((d / _META).read_text(encoding="utf-8"))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{d / _META}: unsupported probe format {meta.get('format')!r}")
        kinds = {k.kind: k for k in (SemanticEntropyProbe, KnowProbe)}
        klass = kinds.get(meta["kind"])
        if klass is None:
            raise ValueError(f"{d / _META}: unknown probe kind {meta['kind']!r}")
        if cls is not LinearProbe and klass is not cls:
            raise ValueError(f"{d} holds a {meta['kind']} probe, not {cls.kind}")
        obj = klass(
            int(meta["layer"]),
            C=float(meta["C"]),
            max_iter=int(meta["max_iter"]),
            seed=int(meta["seed"]),
            name=str(meta["name"]),
        )
        t = {k: v.numpy() for k, v in load_file(str(d / _TENSORS)).items()}
        obj.mean_, obj.scale_, obj.coef_, obj.intercept_ = (
            t["mean"],
            t["scale"],
            t["coef"],
            t["intercept"],
        )
        obj.layer_ = int(meta["layer"])
        obj.train_rate_ = float(meta["train_rate"])
        obj.layer_scores_ = {int(k): float(v) for k, v in meta["layer_scores"].items()}
        obj._load_extra(meta)
        return obj


class SemanticEntropyProbe(LinearProbe):
    """SEP: P(semantic entropy is high) from the prompt's hidden state.

    ``fit(stats, se)`` takes the training prompts' semantic entropies, or computes them
    with ``entropy`` (a :class:`SemanticEntropy`; needs samples in ``stats``) when
    ``se`` is ``None``. SE is binarised at :func:`best_split_threshold` of the training
    values (or at a fixed ``threshold``). Learned: ``threshold_``.
    """

    kind = "SEP"
    default_name = "SEP"

    def __init__(
        self,
        layer: int | Literal["auto"] = "auto",
        *,
        entropy: SemanticEntropy | None = None,
        threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layer, **kwargs)
        self.entropy = entropy
        self.threshold = threshold

    def _se(self, stats: Stats, y: np.ndarray | None) -> np.ndarray:
        if y is not None:
            return np.asarray(y, dtype=np.float64)
        if self.entropy is None:
            raise ValueError("SEP.fit needs SE values, or entropy=SemanticEntropy(...)")
        return self.entropy.score(stats)

    def _targets(self, stats: Stats, y: np.ndarray | None, *, fitting: bool) -> np.ndarray:
        se = self._se(stats, y)
        if fitting:
            self.threshold_ = (
                float(self.threshold) if self.threshold is not None else best_split_threshold(se)
            )
        return (se > self.threshold_).astype(np.int64)

    def _extra_meta(self) -> dict[str, Any]:
        eq = self.entropy.equivalence.key if self.entropy is not None else None
        return {"threshold": self.threshold_, "equivalence": eq}

    def _load_extra(self, meta: dict[str, Any]) -> None:
        self.threshold_ = float(meta["threshold"])
        self.threshold = self.threshold_


class KnowProbe(LinearProbe):
    """PCP, "P(I know)": P(the default answer is wrong) from the prompt's hidden state.

    ``fit(stats, correct)`` takes one boolean per prompt (the default answer is
    correct). :meth:`score` is the risk ``1 - P(I know)``; :meth:`p_know` its complement.
    """

    kind = "PCP"
    default_name = "PCP"

    def _targets(self, stats: Stats, y: np.ndarray | None, *, fitting: bool) -> np.ndarray:
        if y is None:
            raise ValueError("PCP.fit needs the correctness labels of the default answers")
        correct = np.asarray(y).astype(bool).ravel()
        if correct.shape[0] != len(stats):
            raise ValueError(f"{correct.shape[0]} labels for {len(stats)} prompts")
        return (~correct).astype(np.int64)

    def p_know(self, stats: Stats) -> np.ndarray:
        return 1.0 - self.predict_proba(stats)
