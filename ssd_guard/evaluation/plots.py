"""PNG figures of the evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_risk_coverage", "plot_roc"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(results: dict[str, Any], path: str | Path) -> Path:
    """ROC curves: pre-generation scorers, post-generation scorers, mismatch detection."""
    plt = _pyplot()
    hall = results["hallucination"]
    panels = [
        ("Pre-generation (hallucination)", hall["pre_generation"]),
        ("Post-generation (hallucination)", hall["post_generation"]),
    ]
    has_mm = "mismatch" in results
    fig, axes = plt.subplots(
        1, len(panels) + int(has_mm), figsize=(5.2 * (len(panels) + has_mm), 4.8)
    )
    for ax, (title, block) in zip(axes, panels, strict=False):
        for name, r in block.items():
            a = r["auroc"]
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], lw=1.6, label=f"{name} ({a['value']:.3f})")
        ax.set_title(title)
    if has_mm:
        ax = axes[-1]
        mm = results["mismatch"]
        ax.plot(
            mm["roc"]["fpr"],
            mm["roc"]["tpr"],
            lw=1.6,
            label=f"SSD -loglik ({mm['auroc']['value']:.3f})",
        )
        lo, hi = results.get("reference", {}).get("mismatch_auroc", [None, None])
        ax.set_title("Mismatch (foreign answer)")
        if lo is not None:
            ax.text(0.35, 0.08, f"paper: {lo:.2f}-{hi:.2f}", transform=ax.transAxes, fontsize=9)
    for ax in axes:
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="lower right", title="AUROC", title_fontsize=8)
        ax.grid(alpha=0.3)
    meta = results.get("meta", {})
    fig.suptitle(
        f"{meta.get('base_model') or ''} {meta.get('recipe') or ''} - test n={meta.get('n_test')}",
        fontsize=11,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_risk_coverage(results: dict[str, Any], path: str | Path) -> Path:
    """Selective risk (error rate among kept answers) vs coverage, per scorer."""
    plt = _pyplot()
    hall = results["hallucination"]
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.8), sharey=True)
    blocks = [
        ("Pre-generation scorers", hall["pre_generation"]),
        ("Post-generation scorers", hall["post_generation"]),
    ]
    for ax, (title, block) in zip(axes, blocks, strict=True):
        for name, r in block.items():
            rc = r["risk_coverage"]
            ax.plot(rc["coverage"], rc["risk"], lw=1.6, label=f"{name} ({r['aurc']['value']:.3f})")
        rate = hall["positive_rate"]
        ax.axhline(rate, ls="--", c="grey", lw=0.8, label=f"random ({rate:.3f})")
        sel = results.get("selective", {})
        if "aurc_oracle" in sel:
            n = results["meta"]["n_test"]
            n_wrong = round(rate * n)
            xs = [k / n for k in range(1, n + 1)]
            ys = [max(0, k - (n - n_wrong)) / k for k in range(1, n + 1)]
            ax.plot(xs, ys, ls=":", c="black", lw=1, label=f"oracle ({sel['aurc_oracle']:.3f})")
        ax.set_title(title)
        ax.set_xlabel("coverage")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="AURC (lower is better)", title_fontsize=8)
    axes[0].set_ylabel("selective risk (share of wrong answers kept)")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
