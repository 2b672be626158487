"""Does the calibrated threshold keep its promise?

    OMP_NUM_THREADS=1 python benchmarks/calibration.py --workdir runs/smollm2-pooled \
        --source triviaqa --alpha 0.2 --delta 0.1
    OMP_NUM_THREADS=1 python benchmarks/calibration.py --source all --alpha 0.8

For the bundled student and one source (``all`` = every source pooled):

* the fixed split: calibrate (:func:`ssd_guard.training.calibration.calibrate_threshold`, as
  ``ssd-guard calibrate``) on the work directory's validation prompts, apply the threshold
  to the test prompts, report the test coverage and the realised error among answered;
* the guarantee: ``--n-splits`` (≥ 200) random calibration/test re-splits of the
  validation + test prompts (calibration size = the validation split's), the share of
  re-splits whose realised test error among answered exceeds α (``violation_rate``; the
  guarantee says ≤ δ). A re-split where α is infeasible answers nothing: no violation;
* a sweep over α (same re-splits): mean realised error, mean coverage, violation rate and
  the share of re-splits where α is feasible; ``feasible_alphas`` = the α of the sweep
  that are feasible on the fixed validation split;
* ``ssd_auroc`` / ``risk_auroc``: AUROC of the SSD entropy and of the combined risk
  (pre-generation variant, ``ssd-guard fit-risk``) for "the default answer is wrong" on
  the test split; ``signal_auroc``: of the calibrated signal;
* ``selective``: answer / escalate (retrieve) / abstain with two thresholds
  (:func:`ssd_guard.training.calibration.calibrate_selective`, ``--beta``): shares on the test
  split and the joint violation rate over the re-splits.

Writes ``benchmarks/results/calibration-smollm2-<source>.json``, a PNG of realised error
and coverage against α, and a markdown table beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ssd_guard.calibration import SIGNAL_DIRECTIONS, InfeasibleTargetError
from ssd_guard.training.calibration import (
    calibrate_selective,
    calibrate_threshold,
    realised_error,
    signal_grid,
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


def _selective(
    s_val: np.ndarray,
    w_val: np.ndarray,
    s_test: np.ndarray,
    w_test: np.ndarray,
    s_all: np.ndarray,
    w_all: np.ndarray,
    n_cal: int,
    splits: list[np.ndarray],
    args: argparse.Namespace,
    grid: np.ndarray,
    hr: bool,
) -> dict[str, Any]:
    """Two thresholds: the fixed split, and the joint guarantee over the re-splits."""

    def fit(s: np.ndarray, w: np.ndarray) -> Any:
        try:
            return calibrate_selective(
                s,
                w,
                alpha=args.alpha,
                beta=args.beta,
                delta=args.delta,
                grid=grid,
                higher_is_riskier=hr,
            )
        except InfeasibleTargetError:
            return None

    def outcome(sel: Any, s: np.ndarray, w: np.ndarray) -> tuple[float | None, float | None]:
        r = sel.route(s)
        ans, ab = r == "answer", r == "abstain"
        err = float(w[ans].mean()) if ans.any() else None
        right = float((~w[ab]).mean()) if ab.any() else None
        return err, right

    out: dict[str, Any] = {"alpha": args.alpha, "beta": args.beta, "delta": args.delta}
    sel = fit(s_val, w_val)
    out["feasible"] = sel is not None
    if sel is not None:
        r = sel.route(s_test)
        err, right = outcome(sel, s_test, w_test)
        out.update(
            answer_threshold=sel.answer.threshold,
            abstain_threshold=sel.abstain_threshold,
            calibration_shares=sel.shares,
            test_shares={k: float(np.mean(r == k)) for k in ("answer", "escalate", "abstain")},
            test_answer_error=err,
            test_abstain_right=right,
        )
    bad = 0
    for perm in splits:
        cal, test = perm[:n_cal], perm[n_cal:]
        sp = fit(s_all[cal], w_all[cal])
        if sp is None:
            continue
        err, right = outcome(sp, s_all[test], w_all[test])
        bad += int((err or 0.0) > args.alpha or (right or 0.0) > args.beta)
    out["joint_violation_rate"] = bad / len(splits)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "smollm2-pooled")
    ap.add_argument("--artifact", default="bundled")
    ap.add_argument("--source", default="triviaqa", help="a source, or 'all' (pooled)")
    ap.add_argument("--signal", default="entropy", choices=sorted(SIGNAL_DIRECTIONS))
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument(
        "--beta", type=float, default=0.1, help="max right answers among abstained (selective)"
    )
    ap.add_argument("--n-splits", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.n_splits < 200:
        ap.error("--n-splits must be at least 200")

    from sklearn.metrics import roc_auc_score

    from ssd_guard.scoring.ssd import SSDScorer
    from ssd_guard.training.workdir_data import load_workdir

    ssd = SSDScorer.load(args.artifact, embedder_dtype="fp32")
    data = load_workdir(args.workdir)
    source = None if args.source == "all" else args.source
    hr = SIGNAL_DIRECTIONS[args.signal]
    _, s_val, w_val = workdir_signal(
        data, ssd, split="validation", signal=args.signal, source=source
    )
    _, s_test, w_test = workdir_signal(data, ssd, split="test", signal=args.signal, source=source)
    grid = signal_grid(ssd.calibration, args.signal)
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

    def test_auroc(signal: str) -> float | None:
        _, sc, wt = workdir_signal(data, ssd, split="test", signal=signal, source=source)
        sc = sc if SIGNAL_DIRECTIONS[signal] else -sc
        return float(roc_auc_score(wt, sc)) if 0 < wt.sum() < len(wt) else None

    auroc = test_auroc(args.signal)
    ssd_auroc = test_auroc("entropy")
    risk_auroc = test_auroc("risk") if ssd.risk_model is not None else None
    selective = _selective(
        s_val, w_val, s_test, w_test, s_all, w_all, n_cal, splits, args, grid, hr
    )

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
        "signal_auroc": auroc,
        "ssd_auroc": ssd_auroc,
        "risk_auroc": risk_auroc,
        "selective": selective,
        "sweep": sweep,
        "method": (
            "Learn-then-Test via mapie.risk_control.BinaryClassificationController "
            "(precision of 'answer' >= 1 - alpha, Bonferroni-Holm over 50 thresholds = "
            "quantiles of the student's training-split calibration values)"
        ),
        "command": (
            f"OMP_NUM_THREADS=1 python benchmarks/calibration.py --source {args.source} "
            f"--signal {args.signal} --alpha {alpha} --delta {delta} --beta {args.beta} "
            f"--n-splits {args.n_splits}"
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
        f"test n={len(s_test)} (error rate {w_test.mean():.3f}); test AUROC of the "
        f"calibrated signal {auroc if auroc is None else round(auroc, 3)} (SSD entropy "
        f"{ssd_auroc if ssd_auroc is None else round(ssd_auroc, 3)}, combined risk "
        f"{risk_auroc if risk_auroc is None else round(risk_auroc, 3)}). "
        f"Smallest feasible α at δ={delta}: "
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
    if selective.get("feasible"):
        sh = selective["test_shares"]
        lines += [
            "",
            f"Selective answering at α={alpha}, β={args.beta}, δ={delta} (answer below the "
            "first threshold, abstain beyond the second, escalate to retrieval between): "
            f"thresholds {selective['answer_threshold']:.4g} / "
            f"{selective['abstain_threshold']}; test shares answer {sh['answer']:.3f}, "
            f"escalate {sh['escalate']:.3f}, abstain {sh['abstain']:.3f}; error among "
            f"answered {selective['test_answer_error']}, right among abstained "
            f"{selective['test_abstain_right']}; joint violation rate over "
            f"{args.n_splits} re-splits {selective['joint_violation_rate']:.3f}.",
        ]
    else:
        lines += ["", f"Selective answering at α={alpha}, β={args.beta}: infeasible."]
    md = args.out_dir / f"calibration-{tag}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {k: out[k] for k in ("alpha", "delta", "n_calibration", "n_test", "threshold")}
    summary.update({k: out[k] for k in ("coverage", "realised_error", "violation_rate")})
    summary.update(
        {
            k: out[k]
            for k in ("smallest_feasible_alpha", "feasible_alphas", "ssd_auroc", "risk_auroc")
        }
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}, {png}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
