"""`ssd-guard evaluate`: the report of every scorer on a work directory's test split."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ssd_guard._commands import add_command
from ssd_guard.scoring.ssd_answers import ANSWER_SIGNALS

__all__ = ["add_commands", "summary_lines"]


#: The options of ``ssd-guard evaluate`` passed to :func:`run_evaluation` as they are.
_PASSED_AS_IS = (
    "artifact",
    "arc_artifact",
    "mc_data",
    "mc_skip",
    "mc_limit",
    "source",
    "answer_signal",
    "cost_prompts",
    "n_boot",
    "seed",
    "se_threshold",
    "nli_model",
    "device",
    "dtype",
)


def _workdir(path: str | None, config: str | None, what: str) -> Path | None:
    if path:
        return Path(path)
    if config:
        from ssd_guard.training.distill.recipe import load_recipe

        recipe = load_recipe(config)
        return recipe.resolve(recipe.workdir)
    return None


def _pair_scorers(args: argparse.Namespace, log: Any) -> list[Any]:
    """The post-generation scorers named on the command line, on the student's base
    model (loaded once per process)."""
    if not (args.semgrad or args.drafts):
        return []
    from ssd_guard.artifact import load_artifact
    from ssd_guard.models import shared_causal_lm

    art = args.artifact or (Path(_workdir(args.workdir, args.config, "") or ".") / "artifact")
    manifest, _ = load_artifact(art)
    lm = shared_causal_lm(manifest.base_model.id, device=args.device, dtype=args.dtype)
    out: list[Any] = []
    if args.semgrad:
        from ssd_guard.scoring.semgrad import HybridGradScorer, SemGradScorer

        out.append(SemGradScorer.from_config(args.semgrad, lm.model, lm.tokenizer))
        out.append(HybridGradScorer.from_config(args.semgrad, lm.model, lm.tokenizer))
    if args.drafts:
        from ssd_guard.scoring.draft_eu import DraftEUScorer

        out.append(DraftEUScorer.load(args.drafts, lm))
    log("pair scorers: " + ", ".join(str(ps.name) for ps in out))
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate SSD and the baselines (TD, SE, SEP, PCP) on a work dir's test split.

    Score the test split of a distillation work directory with every scorer and write
    report.md, results.json, roc.png and risk_coverage.png.
    """
    from ssd_guard.errors import require_extra

    require_extra("matplotlib", "eval", "ssd-guard evaluate")
    from ssd_guard.errors import ConfigError
    from ssd_guard.evaluation.runner import run_evaluation

    workdir = _workdir(args.workdir, args.config, "work dir")
    if workdir is None:
        raise ConfigError("give the work directory: --workdir DIR or --config RECIPE.yaml")
    arc = _workdir(args.arc_workdir, args.arc_config, "ARC work dir")
    command = args.command_line or "ssd-guard " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = run_evaluation(
        workdir,
        args.out,
        arc_workdir=arc,
        **{k: getattr(args, k) for k in _PASSED_AS_IS},
        command=command,
        log=log,
        pair_scorers=_pair_scorers(args, log),
    )
    print(f"report: {Path(args.out) / 'report.md'}")
    print(summary_lines(results))
    return 0


def summary_lines(results: dict[str, Any]) -> str:
    """What ``evaluate`` prints: the AUROC (wrong default answer) of every scorer before
    generation and of every answer signal after it, the mismatch AUROC and the
    multiple-choice accuracy when evaluated."""
    hall = results["hallucination"]
    sections = [
        ("before generation (prompt only)", hall.get("pre_generation", {})),
        ("after generation (prompt + default answer)", hall.get("post_generation", {})),
    ]
    width = max([10, *(len(n) for _, block in sections for n in block)])
    lines: list[str] = []
    for title, block in sections:
        if not block:
            continue
        lines.append(f"  {title}: AUROC for a wrong answer [95% CI]")
        for name, r in block.items():
            a = r["auroc"]
            ci = ""
            if a.get("low") is not None and a.get("high") is not None:
                ci = f"  [{a['low']:.3f}, {a['high']:.3f}]"
            lines.append(f"    {name:<{width}} AUROC {a['value']:.3f}{ci}")
    mm = results.get("mismatch")
    if mm:
        lines.append(
            f"  answer mismatch ({mm['signal']}, own vs another prompt's answer): "
            f"AUROC {mm['auroc']['value']:.3f}"
        )
    mc = results.get("multiple_choice")
    if mc:
        acc = ", ".join(f"{k} {v['value']:.3f}" for k, v in mc["accuracy"].items())
        lines.append(f"  multiple choice ({mc['n_test']} questions): accuracy {acc}")
    return "\n".join(lines)


def add_commands(subparsers: Any) -> None:
    p = add_command(subparsers, "evaluate", _cmd_evaluate)
    src = p.add_argument_group("inputs")
    src.add_argument("--workdir", help="work directory of `ssd-guard distill` (open QA)")
    src.add_argument("--config", help="the recipe instead of --workdir (its workdir is used)")
    src.add_argument("--artifact", help="student artifact (default: <workdir>/artifact)")
    src.add_argument("--arc-workdir", help="multiple-choice work directory (e.g. ARC-Easy)")
    src.add_argument("--arc-config", help="the MC recipe instead of --arc-workdir")
    src.add_argument("--arc-artifact", help="MC student artifact (default: <arc-workdir>/artifact)")
    p.add_argument("--mc-data", help="multiple-choice JSONL (ARC format)")
    p.add_argument("--mc-skip", type=int, default=0, help="skip the first rows of --mc-data")
    p.add_argument("--mc-limit", type=int, help="rows of --mc-data to use")
    p.add_argument("--source", help="evaluate one source of a pooled work directory")
    p.add_argument(
        "--semgrad",
        help="gradient scorer config (JSON, benchmarks/gradient_scorers.py): adds SemGrad "
        "and HybridGrad as post-generation scorers",
    )
    p.add_argument(
        "--drafts", help="draft-model artifact (`ssd-guard distill-drafts`): adds DraftEU"
    )
    p.add_argument(
        "--answer-signal",
        choices=list(ANSWER_SIGNALS),
        help="SSD answer signal for mismatch / MC (default: the artifact's)",
    )
    p.add_argument("--out", required=True, help="output directory (e.g. benchmarks/results/NAME)")
    p.add_argument(
        "--cost-prompts", type=int, default=20, help="prompts timed per scorer (0: skip)"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--se-threshold", type=float, default=0.8, help="cosine threshold of SE-cos")
    p.add_argument("--nli-model", help="local NLI model directory: adds SE-NLI (SEP targets it)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
