"""``ssd-guard calibrate``: a threshold with a stated guarantee (issue 12).

The calibration prompts are the work directory's *validation* split (never the train or
the test split); see :mod:`ssd_guard.calibration` for the guarantee and its assumptions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from ssd_guard.artifact import bundled_artifact_path
    from ssd_guard.calibration import (
        CALIBRATION_FILENAME,
        SIGNAL_DIRECTIONS,
        CalibrationFile,
        calibrate_threshold,
        default_grid,
        describe_guarantee,
        save_calibration,
        workdir_signal,
    )
    from ssd_guard.evaluation.workdir import load_workdir
    from ssd_guard.scoring.ssd import SSDScorer

    ssd = SSDScorer.load(args.artifact, device=args.device, embedder_dtype="fp32")
    data = load_workdir(args.workdir)
    _, scores, wrong = workdir_signal(
        data, ssd, split="validation", signal=args.signal, source=args.source
    )
    # The candidate grid: quantiles of the student's training-split calibration values
    # (no calibration labels involved); the calibration scores' own quantiles otherwise.
    reference = ssd.calibration.get(args.signal) or list(np.asarray(scores))
    grid = default_grid(reference, n=args.grid_size)
    result = calibrate_threshold(
        scores,
        wrong,
        alpha=args.alpha,
        delta=args.delta,
        grid=grid,
        higher_is_riskier=SIGNAL_DIRECTIONS[args.signal],
    )
    cal = CalibrationFile.from_result(
        result,
        student_fingerprint=ssd.fingerprint,
        signal=args.signal,
        data={
            "workdir": str(args.workdir),
            "split": "validation",
            "source": args.source or "all",
            "error_rate_without_abstention": float(np.mean(wrong)),
        },
    )
    if args.out:
        out = Path(args.out)
    else:
        art = bundled_artifact_path() if args.artifact == "bundled" else Path(args.artifact)
        out = art / CALIBRATION_FILENAME
    path = save_calibration(cal, out)
    summary: dict[str, Any] = {
        "calibration_file": str(path),
        "signal": cal.signal,
        "alpha": cal.alpha,
        "delta": cal.delta,
        "threshold": cal.threshold,
        "n_valid_thresholds": len(cal.valid_thresholds),
        "n_calibration": cal.n_calibration,
        "coverage": cal.coverage,
        "calibration_error": cal.calibration_error,
    }
    print(json.dumps(summary, indent=2))
    print(describe_guarantee(cal))
    return 0


def add_commands(sub: Any) -> None:
    c = sub.add_parser(
        "calibrate",
        help="choose a threshold guaranteeing the error rate among answered prompts",
        description=(
            "Learn-then-Test (MAPIE) on the work directory's validation split: the "
            "threshold such that among answered prompts at most ALPHA are wrong with "
            "probability at least 1 - DELTA (prompts assumed exchangeable)."
        ),
    )
    c.add_argument("--workdir", required=True, type=Path, help="distillation work directory")
    c.add_argument("--source", help="calibrate on this source's prompts only")
    c.add_argument("--artifact", default="bundled", help="student artifact (default: bundled)")
    c.add_argument("--alpha", type=float, required=True, help="max error rate among answered")
    c.add_argument("--delta", type=float, default=0.1, help="1 - confidence (default 0.1)")
    c.add_argument("--signal", default="entropy", choices=["entropy", "pmi", "loglik"])
    c.add_argument("--grid-size", type=int, default=50, help="candidate thresholds (50)")
    c.add_argument("--out", help="calibration file (default: beside the artifact)")
    c.add_argument("--device")
    c.set_defaults(func=_calibrate)
