"""Engine sub-commands: ``distill``, ``score`` and ``artifact``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ssd_guard._commands import add_command

#: Loggers whose INFO lines a pipeline command shows on stderr: why a stage reruns, the
#: dtype ``auto`` chose, the thread count, the closing notes.
_PIPELINE_LOGGERS = ("ssd_guard.training.distill", "ssd_guard.drafts", "ssd_guard.models")


@contextlib.contextmanager
def _stderr_logs(names: Sequence[str] = _PIPELINE_LOGGERS) -> Iterator[None]:
    """Show the INFO lines of the *names* loggers on stderr while the block runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def run_stage_pipeline(pipeline: Callable[..., Path], recipe: Any, args: argparse.Namespace) -> int:
    """Run a resumable stage pipeline from the arguments of :func:`add_pipeline_args`,
    reporting each stage (and the pipeline's INFO log lines) on stderr; prints the work
    directory."""

    def report(name: str, state: str, seconds: float) -> None:
        msg = (
            f"[{name}] skipped (already complete)"
            if state == "skipped"
            else f"[{name}] done in {seconds:.1f} s"
        )
        print(msg, file=sys.stderr, flush=True)

    with _stderr_logs():
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


def add_pipeline_args(parser: Any, config_help: str, stages: Sequence[str] | None = None) -> None:
    """The arguments of a resumable stage pipeline (``distill``, ``distill-drafts``);
    *stages* (the pipeline's stage names) are listed in the help of ``--until`` and
    ``--force``."""
    names = f"one of: {', '.join(stages)}" if stages else ""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--workdir", help="override the recipe's work directory")
    parser.add_argument(
        "--until", metavar="STAGE", help="stop after this stage" + (f" ({names})" if names else "")
    )
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo this stage even if its inputs are unchanged (repeatable"
        + (f"; {names})" if names else ")"),
    )
    parser.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _distill(args: argparse.Namespace) -> int:
    """Train an SSD student from a recipe (resumable).

    Run the recipe's stages in order, each skipped while what it depends on (its recipe
    fields, the data files' content, the outputs of the stages before it) is unchanged
    since it completed; a killed run resumes where it stopped.
    """
    from ssd_guard.errors import require_extra

    require_extra("sklearn", "train", "ssd-guard distill")
    from ssd_guard.training.distill.pipeline import run_pipeline
    from ssd_guard.training.distill.recipe import load_recipe

    # run_pipeline logs (shown on stderr) the dtype, the threads, why a stage reruns and,
    # at the end, a note when the artifact has no combined risk model (`fit-risk`).
    pipeline = functools.partial(run_pipeline, threads=args.threads)
    return run_stage_pipeline(pipeline, load_recipe(args.config), args)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


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
    """Score prompts (and answers) with a student, and show what a policy decides."""
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
    """Verify an artifact as SSDScorer.load does (weights sha256, tensors and head shapes,
    risk model, base model and embedder) and print its manifest.

    Run the checks ``SSDScorer.load`` runs (one shared function), then print the
    manifest; a refused artifact exits 1 with load's own message (the CLI).
    """
    from ssd_guard.scoring.ssd import verify_artifact

    student = verify_artifact(args.path, models=not args.no_models, device=args.device)
    manifest = student.manifest
    info = manifest.model_dump(mode="json")
    info["tensors"] = {k: list(v.shape) for k, v in sorted(student.tensors.items())}
    info["verified"] = {
        "student_fingerprint": manifest.fingerprint,
        "risk_model": student.risk_model is not None,
        "base_model": "skipped (--no-models)" if args.no_models else "matches",
    }
    print(json.dumps(info, indent=2))
    return 0


def add_commands(sub: Any) -> None:
    from ssd_guard.training.distill import STAGES

    p = add_command(sub, "distill", _distill)
    add_pipeline_args(p, "recipe YAML (see training/)", stages=STAGES)
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        help="torch CPU threads (default: the recipe's `threads`, else OMP_NUM_THREADS when "
        "set, else min(physical cores, CPUs this process may use, cgroup CPU quota)); "
        "oversubscribing a shared machine slowed the teacher 4-5x",
    )

    s = add_command(sub, "score", _score)
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

    a = add_command(sub, "artifact", _artifact)
    a.add_argument("path", nargs="?", default="bundled")
    a.add_argument(
        "--no-models",
        action="store_true",
        help="skip loading the base model and embedder (no base-model match check)",
    )
    a.add_argument("--device", default="cpu", help="where to load the models (default: cpu)")
