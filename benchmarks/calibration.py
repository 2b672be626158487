"""Does the calibrated threshold keep its promise? (issue 12)

    OMP_NUM_THREADS=1 python benchmarks/calibration.py --workdir runs/smollm2-pooled \
        --source triviaqa --alpha 0.2 --delta 0.1
    OMP_NUM_THREADS=1 python benchmarks/calibration.py --source all --alpha 0.8

For the bundled student and one source (``all`` = every source pooled):

* the fixed split: calibrate (:func:`ssd_guard.calibration.calibrate_threshold`, as
  ``ssd-guard calibrate``) on the work directory's validation prompts, apply the threshold
  to the test prompts, report the test coverage and the realised error among answered;
* the guarantee: ``--n-splits`` (≥ 200) random calibration/test re-splits of the
  validation + test prompts (calibration size = the validation split's), the share of
  re-splits whose realised test error among answered exceeds α (``violation_rate``; the
  guarantee says ≤ δ). A re-split where α is infeasible answers nothing: no violation;
* a sweep over α (same re-splits): mean realised error, mean coverage, violation rate and
  the share of re-splits where α is feasible; ``feasible_alphas`` = the α of the sweep
  that are feasible on the fixed validation split;
* ``ssd_auroc``: AUROC of the signal for "the default answer is wrong" on the test split.

Writes ``benchmarks/results/calibration-smollm2-<source>.json``, a PNG of realised error
and coverage against α, and a markdown table beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ssd_guard.calibration import (
    SIGNAL_DIRECTIONS,
    InfeasibleTargetError,
    calibrate_threshold,
    default_grid,
    realised_error,
    smallest_feasible_alpha,
    workdir_signal,
)

ROOT = Path(__file__).resolve().parents[1]


def _try(
    s: np.ndarray, w: np.ndarray, alpha: float, delta: float, grid: np.ndarray, hr: bool
) -> float | None:
    try:
        return calibrate_threshold(
            s, w, alpha=alpha, delta=delta, grid=grid, higher_is_riskier=hr
        ).threshold
    except InfeasibleTargetError:
        return None


def _resplits(
    s: np.ndarray,
    w: np.ndarray,
    n_cal: int,
    alpha: float,
    delta: float,
    grid: np.ndarray,
    hr: bool,
    splits: list[np.ndarray],
) -> dict[str, Any]:
    errors, coverages, violations, feasible = [], [], 0, 0
    for perm in splits:
        cal, test = perm[:n_cal], perm[n_cal:]
        thr = _try(s[cal], w[cal], alpha, delta, grid, hr)
        if thr is None:
            coverages.append(0.0)
            continue
        feasible += 1
        keep = s[test] <= thr if hr else s[test] >= thr
        coverages.append(float(keep.mean()))
        err = realised_error(s[test], w[test], thr, hr)
        if keep.any():
            errors.append(err)
        violations += int(err > alpha)
    return {
        "alpha": alpha,
        "feasible_share": feasible / len(splits),
        "violation_rate": violations / len(splits),
        "violation_rate_when_feasible": (violations / feasible) if feasible else None,
        "mean_realised_error": float(np.mean(errors)) if errors else None,
        "mean_coverage": float(np.mean(coverages)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--source", default="triviaqa", help="a source, or 'all' (pooled)")
    ap.add_argument("--signal", default="entropy", choices=sorted(SIGNAL_DIRECTIONS))
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--n-splits", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.n_splits < 200:
        ap.error("--n-splits must be at least 200")

    from sklearn.metrics import roc_auc_score

    from ssd_guard.evaluation.workdir import load_workdir
    from ssd_guard.scoring.ssd import SSDScorer

    ssd = SSDScorer.load(args.artifact, embedder_dtype="fp32")
    data = load_workdir(args.workdir)
    source = None if args.source == "all" else args.source
    hr = SIGNAL_DIRECTIONS[args.signal]
    _, s_val, w_val = workdir_signal(
        data, ssd, split="validation", signal=args.signal, source=source
    )
    _, s_test, w_test = workdir_signal(data, ssd, split="test", signal=args.signal, source=source)
    grid = default_grid(ssd.calibration[args.signal])
    alpha, delta = args.alpha, args.delta

    # The fixed split: validation → test.
    thr = _try(s_val, w_val, alpha, delta, grid, hr)
    smallest = smallest_feasible_alpha(s_val, w_val, delta=delta, grid=grid, higher_is_riskier=hr)
    if thr is not None:
        keep = s_test <= thr if hr else s_test >= thr
        coverage, err = float(keep.mean()), realised_error(s_test, w_test, thr, hr)
    else:
        coverage, err = 0.0, None

    # Re-splits of the validation + test prompts.
    s_all = np.concatenate([s_val, s_test])
    w_all = np.concatenate([w_val, w_test])
    rng = np.random.default_rng(args.seed)
    splits = [rng.permutation(len(s_all)) for _ in range(args.n_splits)]
    n_cal = len(s_val)
    main_point = _resplits(s_all, w_all, n_cal, alpha, delta, grid, hr, splits)
    alphas = [round(float(a), 2) for a in np.arange(0.05, 1.0, 0.05)]
    sweep = [_resplits(s_all, w_all, n_cal, a, delta, grid, hr, splits) for a in alphas]
    for point in sweep:
        t = _try(s_val, w_val, point["alpha"], delta, grid, hr)
        point["fixed_split_threshold"] = t
        if t is not None:
            k = s_test <= t if hr else s_test >= t
            point["fixed_split_coverage"] = float(k.mean())
            point["fixed_split_realised_error"] = realised_error(s_test, w_test, t, hr)
    feasible_alphas = [float(p["alpha"]) for p in sweep if p["fixed_split_threshold"] is not None]
    oriented = s_test if hr else -s_test
    auroc = float(roc_auc_score(w_test, oriented)) if 0 < w_test.sum() < len(w_test) else None

    tag = f"smollm2-{args.source}" + ("" if args.signal == "entropy" else f"-{args.signal}")
    out: dict[str, Any] = {
        "artifact": str(args.artifact),
        "student_fingerprint": ssd.fingerprint,
        "source": args.source,
        "signal": args.signal,
        "alpha": alpha,
        "delta": delta,
        "n_calibration": len(s_val),
        "n_test": len(s_test),
        "error_rate_calibration": float(w_val.mean()),
        "error_rate_test": float(w_test.mean()),
        "feasible": thr is not None,
        "smallest_feasible_alpha": smallest,
        "threshold": thr,
        "coverage": coverage,
        "realised_error": err,
        "violation_rate": main_point["violation_rate"],
        "n_resplits": args.n_splits,
        "resplits": main_point,
        "feasible_alphas": feasible_alphas,
        "ssd_auroc": auroc,
        "sweep": sweep,
        "method": (
            "Learn-then-Test via mapie.risk_control.BinaryClassificationController "
            "(precision of 'answer' >= 1 - alpha, Bonferroni-Holm over 50 thresholds = "
            "quantiles of the student's training-split calibration values)"
        ),
        "command": (
            f"OMP_NUM_THREADS=1 python benchmarks/calibration.py --source {args.source} "
            f"--signal {args.signal} --alpha {alpha} --delta {delta} --n-splits {args.n_splits}"
        ),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"calibration-{tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [p["alpha"] for p in sweep]
    ys = [p["mean_realised_error"] for p in sweep]
    ax1.plot([0, 1], [0, 1], "k--", lw=0.8, label="error = α")
    ax1.plot(
        [x for x, y in zip(xs, ys) if y is not None],
        [y for y in ys if y is not None],
        "o-",
        label="mean realised test error (feasible re-splits)",
    )
    ax1.axhline(float(w_all.mean()), color="grey", lw=0.8, label="error without abstention")
    ax1.set_xlabel("α (guaranteed max error among answered)")
    ax1.set_ylabel("realised error among answered")
    ax1.legend(fontsize=7)
    ax2.plot(xs, [p["mean_coverage"] for p in sweep], "o-", label="mean coverage")
    ax2.plot(xs, [p["feasible_share"] for p in sweep], "s--", label="share of re-splits feasible")
    ax2.plot(xs, [p["violation_rate"] for p in sweep], "^:", label="violation rate")
    ax2.axhline(delta, color="red", lw=0.8, label=f"δ = {delta}")
    ax2.set_xlabel("α")
    ax2.legend(fontsize=7)
    fig.suptitle(f"SSD {args.signal} calibration, SmolLM2, {args.source} (δ = {delta})")
    fig.tight_layout()
    png = args.out_dir / f"calibration-{tag}.png"
    fig.savefig(png, dpi=110)

    lines = [
        f"# Calibrated thresholds: SmolLM2, {args.source}, signal {args.signal}",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Calibration = validation split (n={len(s_val)}, error rate {w_val.mean():.3f}); "
        f"test n={len(s_test)} (error rate {w_test.mean():.3f}); SSD AUROC on test "
        f"{auroc if auroc is None else round(auroc, 3)}. Smallest feasible α at δ={delta}: "
        f"{smallest}. Feasible α of the sweep: {feasible_alphas or 'none'}.",
        "",
        f"![realised error and coverage vs α](calibration-{tag}.png)",
        "",
        f"| α | feasible share | violation rate ({args.n_splits} re-splits) | mean realised "
        "error | mean coverage | fixed split: threshold / coverage / error |",
        "|---|---|---|---|---|---|",
    ]
    for p in sweep:
        fx = (
            f"{p['fixed_split_threshold']:.3f} / {p['fixed_split_coverage']:.3f} / "
            f"{p['fixed_split_realised_error']:.3f}"
            if p["fixed_split_threshold"] is not None
            else "infeasible"
        )
        me = p["mean_realised_error"]
        lines.append(
            f"| {p['alpha']:.2f} | {p['feasible_share']:.3f} | {p['violation_rate']:.3f} | "
            f"{'–' if me is None else f'{me:.3f}'} | {p['mean_coverage']:.3f} | {fx} |"
        )
    md = args.out_dir / f"calibration-{tag}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {k: out[k] for k in ("alpha", "delta", "n_calibration", "n_test", "threshold")}
    summary.update({k: out[k] for k in ("coverage", "realised_error", "violation_rate")})
    summary.update({k: out[k] for k in ("smallest_feasible_alpha", "feasible_alphas", "ssd_auroc")})
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}, {png}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
