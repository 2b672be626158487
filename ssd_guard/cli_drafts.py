"""``ssd-guard distill-drafts``: train the draft models of the DraftEU scorer."""

from __future__ import annotations

import argparse
from typing import Any

from ssd_guard.cli_engine import add_pipeline_args, run_stage_pipeline


def _distill_drafts(args: argparse.Namespace) -> int:
    from ssd_guard.training.drafts.recipe import load_draft_recipe
    from ssd_guard.training.drafts.train import run_draft_pipeline

    return run_stage_pipeline(run_draft_pipeline, load_draft_recipe(args.config), args)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "distill-drafts",
        help="train Data-Diverse Drafts + an OSD proxy for the DraftEU scorer (resumable)",
    )
    add_pipeline_args(p, "draft recipe YAML (see training/)")
    p.set_defaults(func=_distill_drafts)
