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


def _calibration_for(scorer: Any, scope: str) -> dict[str, Any] | None:
    """The scorer's calibration values, ``risk`` read on the variant computed at *scope*
    (``pre`` before generation, ``post`` after), as the guard reads them."""
    base = dict(getattr(scorer, "calibration", None) or {})
    variant = "risk:pre" if scope == "prompt" else "risk:post"
    if variant in base:
        base["risk"] = base[variant]
    return base or None


def _rule_outcomes(
    policy: Any, scope: str, scores: dict[str, float], calibration: dict[str, Any] | None
) -> dict[str, Any]:
    """What *policy* decides at *scope* on *scores*, and for each rule of the scope its
    resolved thresholds and the action it would take on its own (``None``: no match)."""
    from ssd_guard.errors import PolicyError

    rules: list[dict[str, Any]] = []
    for rule in policy.rules:
        if rule.scope != scope:
            continue
        entry: dict[str, Any] = {
            "rule": rule.name,
            "thresholds": policy.resolve_thresholds(rule, calibration),
        }
        alone = policy.model_copy(update={"rules": [rule], "default_action": "allow"})
        try:
            d = alone.decide(scope, scores, calibration=calibration)
            entry["action"] = d.action if d.rule == rule.name else None
            if d.missing_scores:
                entry["missing_scores"] = list(d.missing_scores)
        except PolicyError as exc:  # e.g. a quantile bound with no calibration values
            entry["action"], entry["error"] = None, str(exc)
        rules.append(entry)
    try:
        d = policy.decide(scope, scores, calibration=calibration)
        decision: dict[str, Any] = {"action": d.action, "rule": d.rule}
    except PolicyError as exc:
        decision = {"action": None, "rule": None, "error": str(exc)}
    return {**decision, "rules": rules}


def score_report(
    scorer: Any, policy: Any, prompts: list[str], answers: list[str] | None = None
) -> list[dict[str, Any]]:
    """What ``ssd-guard score`` prints: per prompt its ``entropy`` (and ``risk``, the
    combined P(wrong), when the student has a risk model), per answer its ``loglik`` /
    ``pmi`` / ``consensus`` (and ``risk``), and what *policy* decides on them: each rule's
    resolved thresholds and the action it would take."""
    if hasattr(scorer, "prompt_signals"):
        pre: dict[str, list[float]] = scorer.prompt_signals(prompts)
    else:
        pre = {"entropy": scorer.score_prompts(prompts)}
    post: dict[str, list[float]] = {}
    if answers is not None:
        with_risk = getattr(scorer, "risk_model", None) is not None
        post = scorer.answer_signals(prompts, answers, **({"with_risk": True} if with_risk else {}))
    out: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        scores = {k: float(v[i]) for k, v in pre.items()}
        row: dict[str, Any] = {"prompt": prompt, **scores}
        decisions = {
            "name": policy.name,
            "source": policy.source,
            "prompt": _rule_outcomes(policy, "prompt", scores, _calibration_for(scorer, "prompt")),
        }
        if answers is not None:
            row["answer"] = answers[i]
            answer_scores = {k: float(v[i]) for k, v in post.items()}
            row.update({f"answer_{k}": v for k, v in answer_scores.items()})
            decisions["answer"] = _rule_outcomes(
                policy,
                "answer",
                {"entropy": scores["entropy"], **answer_scores},
                _calibration_for(scorer, "answer"),
            )
        row["policy"] = decisions
        out.append(row)
    return out


def _score(args: argparse.Namespace) -> int:
    from ssd_guard.policy import default_policy_path, load_policy
    from ssd_guard.scoring.ssd import SSDScorer

    prompts = list(args.prompts)
    if args.answer and len(args.answer) != len(prompts):
        print("ssd-guard: error: give one --answer per prompt", file=sys.stderr)
        return 2
    policy = load_policy(args.policy or default_policy_path())
    scorer = SSDScorer.load(args.artifact, device=args.device)
    answers = list(args.answer) if args.answer else None
    print(json.dumps(score_report(scorer, policy, prompts, answers), indent=2))
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

    s = sub.add_parser(
        "score",
        help="score prompts (and answers) with a student, and show what a policy decides",
    )
    s.add_argument("prompts", nargs="+", help="prompt texts (questions)")
    s.add_argument("--answer", action="append", help="an answer per prompt (repeatable)")
    s.add_argument("--artifact", default="bundled", help="artifact directory (default: bundled)")
    s.add_argument(
        "--policy",
        metavar="FILE",
        help="policy whose rules are shown with their thresholds and decisions "
        "(default: the default policy)",
    )
    s.add_argument("--device")
    s.set_defaults(func=_score)

    a = sub.add_parser("artifact", help="verify an artifact and print its manifest")
    a.add_argument("path", nargs="?", default="bundled")
    a.set_defaults(func=_artifact)
