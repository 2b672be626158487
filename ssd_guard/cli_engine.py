"""Engine sub-commands: ``distill``, ``score`` and ``artifact``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_stage_pipeline(pipeline: Callable[..., Path], recipe: Any, args: argparse.Namespace) -> int:
    """Run a resumable stage pipeline from the arguments of :func:`add_pipeline_args`,
    reporting each stage on stderr; prints the work directory."""

    def report(name: str, state: str, seconds: float) -> None:
        msg = (
            f"[{name}] skipped (already complete)"
            if state == "skipped"
            else f"[{name}] done in {seconds:.1f} s"
        )
        print(msg, file=sys.stderr, flush=True)

    root = pipeline(
        recipe,
        workdir=args.workdir,
        until=args.until,
        force=tuple(args.force),
        device=args.device,
        progress=not args.quiet,
        on_stage=report,
    )
    print(root)
    return 0


def add_pipeline_args(parser: Any, config_help: str) -> None:
    """The arguments of a resumable stage pipeline (``distill``, ``distill-drafts``)."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--workdir", help="override the recipe's work directory")
    parser.add_argument("--until", help="stop after this stage")
    parser.add_argument("--force", action="append", default=[], help="redo this stage (repeatable)")
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _distill(args: argparse.Namespace) -> int:
    from ssd_guard.distill.pipeline import run_pipeline
    from ssd_guard.distill.recipe import load_recipe

    return run_stage_pipeline(run_pipeline, load_recipe(args.config), args)


def _score(args: argparse.Namespace) -> int:
    from ssd_guard.scoring.ssd import SSDScorer

    scorer = SSDScorer.load(args.artifact, device=args.device)
    prompts = list(args.prompts)
    ent = scorer.score_prompts(prompts)
    out: list[dict[str, Any]] = [{"prompt": p, "entropy": e} for p, e in zip(prompts, ent)]
    if args.answer:
        if len(args.answer) != len(prompts):
            print("ssd-guard: error: give one --answer per prompt", file=sys.stderr)
            return 2
        for row, ll in zip(out, scorer.score_answers(prompts, list(args.answer))):
            row["answer_loglik"] = ll
    print(json.dumps(out, indent=2))
    return 0


def _artifact(args: argparse.Namespace) -> int:
    from ssd_guard.artifact import load_artifact

    manifest, tensors = load_artifact(args.path)
    info = manifest.model_dump(mode="json")
    info["tensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    print(json.dumps(info, indent=2))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("distill", help="train an SSD student from a recipe (resumable)")
    add_pipeline_args(p, "recipe YAML (see training/)")
    p.set_defaults(func=_distill)

    s = sub.add_parser("score", help="score prompts (and answers) with a student")
    s.add_argument("prompts", nargs="+", help="prompt texts (questions)")
    s.add_argument("--answer", action="append", help="an answer per prompt (repeatable)")
    s.add_argument("--artifact", default="bundled", help="artifact directory (default: bundled)")
    s.add_argument("--device")
    s.set_defaults(func=_score)

    a = sub.add_parser("artifact", help="verify an artifact and print its manifest")
    a.add_argument("path", nargs="?", default="bundled")
    a.set_defaults(func=_artifact)
