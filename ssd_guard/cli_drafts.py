"""``ssd-guard distill-drafts``: train the draft models of the DraftEU scorer."""

from __future__ import annotations

import argparse
from typing import Any

from ssd_guard._commands import add_command
from ssd_guard.cli_engine import add_pipeline_args, run_stage_pipeline


def _distill_drafts(args: argparse.Namespace) -> int:
    """Train Data-Diverse Drafts + an OSD proxy for the DraftEU scorer (resumable)."""
    from ssd_guard.training.drafts.recipe import load_draft_recipe
    from ssd_guard.training.drafts.train import run_draft_pipeline

    return run_stage_pipeline(run_draft_pipeline, load_draft_recipe(args.config), args)


def add_commands(sub: Any) -> None:
    p = add_command(sub, "distill-drafts", _distill_drafts)
    add_pipeline_args(p, "draft recipe YAML (see training/)")
