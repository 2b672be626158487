"""``ssd-guard calibrate``: thresholds with a stated guarantee; ``ssd-guard fit-risk``: the
student's combined risk signal.

The calibration prompts are the work directory's *validation* split (never the train or
the test split); see :mod:`ssd_guard.calibration` for the guarantee and its assumptions.
The risk model is fitted on the *training* split (selection on validation); see
:mod:`ssd_guard.scoring.risk`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ssd_guard._commands import add_command
from ssd_guard.signals import SIGNALS

__all__ = ["add_commands"]


def _workdir_of(args: argparse.Namespace) -> Path:
    """``--workdir``, or the work directory a ``--config`` recipe names."""
    if args.workdir is not None:
        return Path(args.workdir)
    if args.config is None:
        raise SystemExit("give --workdir W or --config RECIPE")
    from ssd_guard.training.distill.recipe import load_recipe

    recipe = load_recipe(args.config)
    return Path(recipe.resolve(recipe.workdir))


def _calibrate(args: argparse.Namespace) -> int:
    """Choose a threshold guaranteeing the error rate among answered prompts.

    Learn-then-Test (MAPIE) on the work directory's validation split: the threshold such
    that among answered prompts at most ALPHA are wrong with probability at least 1 -
    DELTA (prompts assumed exchangeable).
    """
    from ssd_guard.errors import require_extra

    require_extra("mapie", "train", "ssd-guard calibrate")
    import numpy as np

    from ssd_guard.artifact import bundled_artifact_path
    from ssd_guard.calibration import (
        SIGNAL_DIRECTIONS,
        CalibrationFile,
        calibration_filename,
        describe_guarantee,
        save_calibration,
    )
    from ssd_guard.scoring.ssd import SSDScorer
    from ssd_guard.training.calibration import (
        calibrate_selective,
        calibrate_threshold,
        default_grid,
        signal_grid,
        workdir_signal,
    )
    from ssd_guard.training.workdir_data import load_workdir

    ssd = SSDScorer.load(args.artifact, device=args.device, embedder_dtype="fp32")
    workdir = _workdir_of(args)
    data = load_workdir(workdir)
    _, scores, wrong = workdir_signal(
        data, ssd, split="validation", signal=args.signal, source=args.source
    )
    # The candidate grid: quantiles of the student's training-split calibration values
    # (no calibration labels involved); the calibration scores' own quantiles otherwise.
    if args.signal == "risk" or ssd.calibration.get(args.signal):
        grid = signal_grid(ssd.calibration, args.signal, n=args.grid_size)
    else:
        grid = default_grid(list(np.asarray(scores)), n=args.grid_size)
    hi = SIGNAL_DIRECTIONS[args.signal]
    selective = None
    if args.abstain_beta is not None:
        selective = calibrate_selective(
            scores,
            wrong,
            alpha=args.alpha,
            beta=args.abstain_beta,
            delta=args.delta,
            grid=grid,
            higher_is_riskier=hi,
        )
        result = selective.answer
    else:
        result = calibrate_threshold(
            scores, wrong, alpha=args.alpha, delta=args.delta, grid=grid, higher_is_riskier=hi
        )
    cal = CalibrationFile.from_result(
        result,
        student_fingerprint=ssd.fingerprint,
        signal=args.signal,
        data={
            "workdir": str(workdir),
            "split": "validation",
            "source": args.source or "all",
            "error_rate_without_abstention": float(np.mean(wrong)),
        },
    )
    if selective is not None:
        # The answer threshold's guarantee holds at delta/2 and so does the abstain one's:
        # together, at delta (union bound). The file states the joint delta.
        cal.delta = float(args.delta)
        cal.abstain_threshold = selective.abstain_threshold
        cal.abstain_beta = selective.beta
        cal.shares = selective.shares
    if args.out:
        out = Path(args.out)
    else:
        art = bundled_artifact_path() if args.artifact == "bundled" else Path(args.artifact)
        out = art / calibration_filename(args.signal)
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
    if selective is not None:
        summary.update(
            abstain_threshold=selective.abstain_threshold,
            abstain_beta=selective.beta,
            shares=selective.shares,
            abstain_right_rate=selective.abstain_right_rate,
        )
    print(json.dumps(summary, indent=2))
    print(describe_guarantee(cal))
    return 0


def _add_workdir_args(parser: Any) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", type=Path, help="distillation work directory")
    src.add_argument("--config", type=Path, help="distillation recipe (its work directory)")


def add_commands(sub: Any) -> None:
    c = add_command(sub, "calibrate", _calibrate)
    _add_workdir_args(c)
    c.add_argument("--source", help="calibrate on this source's prompts only")
    c.add_argument("--artifact", default="bundled", help="student artifact (default: bundled)")
    c.add_argument("--alpha", type=float, required=True, help="max error rate among answered")
    c.add_argument("--delta", type=float, default=0.1, help="1 - confidence (default 0.1)")
    c.add_argument(
        "--signal",
        default="entropy",
        choices=[n for n, s in SIGNALS.items() if s.calibratable],
        help="entropy (default), risk (the combined risk before generation; needs "
        "`ssd-guard fit-risk`), or an answer signal of the default answer",
    )
    c.add_argument(
        "--abstain-beta",
        type=float,
        help="also calibrate an abstain threshold: among abstained prompts at most BETA "
        "would have been answered right; between the two thresholds the guard escalates "
        "(e.g. retrieves). Both guarantees hold jointly with probability 1 - DELTA",
    )
    c.add_argument("--grid-size", type=int, default=50, help="candidate thresholds (50)")
    c.add_argument("--out", help="calibration file (default: beside the artifact)")
    c.add_argument("--device")

    f = add_command(sub, "fit-risk", _fit_risk)
    _add_workdir_args(f)
    f.add_argument("--artifact", default="bundled", help="student artifact (default: bundled)")
    f.add_argument("--out", type=Path, help="directory to write to (default: the artifact)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument(
        "--loso-rows",
        choices=["validation", "train+validation"],
        default="validation",
        help="where a held-out source is scored when the inputs and C are chosen "
        "leave-one-source-out: its validation rows (default), or its training rows too "
        "(never fitted on while it is held out; more rows, less noise)",
    )
    f.add_argument(
        "--report",
        type=Path,
        help="write the selection report (JSON): per variant the LOSO table, the choice, "
        "and the test split's per-source AUROCs of the risk against each single input",
    )
    f.add_argument("--device")


def _fit_risk(args: argparse.Namespace) -> int:
    """Fit the student's combined risk signal (P(default answer wrong)).

    Fit the combined risk (logistic regression over SSD entropy, the SSD answer signals,
    PCP and SEP probes on the student's features, and the generation's token statistics)
    on the work directory's training split; write risk.safetensors into the student's
    artifact directory.
    """
    from ssd_guard.errors import require_extra

    require_extra("sklearn", "train", "ssd-guard fit-risk")
    from ssd_guard.artifact import bundled_artifact_path
    from ssd_guard.scoring.ssd import SSDScorer
    from ssd_guard.training.risk_fit import fit_risk_with_report, workdir_token_stats
    from ssd_guard.training.workdir_data import load_workdir

    ssd = SSDScorer.load(args.artifact, device=args.device, embedder_dtype="fp32")
    data = load_workdir(_workdir_of(args))
    enc = ssd.encoder
    ts = workdir_token_stats(data, enc.model, enc.tokenizer, log=print)
    model, report = fit_risk_with_report(
        data, ssd, token_stats=ts, seed=args.seed, loso_rows=args.loso_rows, log=print
    )
    out = args.out or (
        bundled_artifact_path() if args.artifact == "bundled" else Path(args.artifact)
    )
    path = model.save(out)
    if args.report is not None:
        report["risk_model"] = str(path)
        report["command"] = "ssd-guard " + " ".join(sys.argv[1:])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(_finite(report), indent=2) + "\n", encoding="utf-8")
        _print_test_table(report)
    print(json.dumps({"risk_model": str(path), **model.info}, indent=2, default=str))
    return 0


def _finite(obj: Any) -> Any:
    """*obj* with every non-finite float as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _print_test_table(report: dict[str, Any]) -> None:
    """Per variant and source: the risk's test AUROC against its best single input."""
    for name, rep in report["variants"].items():
        ch = rep["choice"]
        print(f"risk {name}: chose {ch['candidate']} ({', '.join(ch['inputs'])}), C {ch['C']}")
        for key in ("test", "test_loso"):
            for s, r in rep.get(key, {}).get("per_source", {}).items():
                flag = "ok" if r["combined_ge_best_single"] else "BELOW"
                print(
                    f"  {key:9s} {s:16s} risk {r['combined']:.3f}  best single "
                    f"{r['best_single']} {r['best_single_auroc']:.3f}  {flag}"
                )
