"""Helpers of the evaluation's sections: bootstrap intervals, curves, the run's environment."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ssd_guard.training import metrics as M

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
