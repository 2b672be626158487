"""Policy files: :func:`load_policy`, the shipped default, and checks of what a policy names.

:func:`load_policy` reports problems as ``FILE: KEY.PATH[i]: reason`` (one line per
problem); :func:`check_policy_references` (run by ``ssd-guard check-policy``) also refuses a
``student`` directory or a ``proxy_model`` that cannot be found, without loading either.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

from ssd_guard.policy.parsing import MAX_POLICY_BYTES, parse_policy_yaml, too_large_reason
from ssd_guard.policy.reporting import ROOT, format_path, policy_error, policy_errors
from ssd_guard.policy.schema import Policy

__all__ = [
    "check_policy_file",
    "check_policy_references",
    "default_policy_path",
    "load_default_policy",
    "load_policy",
    "resolve_calibrated",
    "resolve_proxy_model",
    "resolve_student",
]


def load_policy(path: str | Path) -> Policy:
    """Read and validate a YAML policy file.

    Raises :class:`~ssd_guard.errors.PolicyError` as ``FILE: KEY.PATH: reason`` (one line
    per problem, the first being the most relevant), also for YAML syntax errors
    (``FILE: line L, column C:``), empty files, a non-mapping top level, duplicate keys /
    rule names, unknown keys, keys YAML reads as no string (``on:``), a file larger than
    :data:`~ssd_guard.policy.parsing.MAX_POLICY_BYTES` or with more than
    :data:`~ssd_guard.policy.parsing.MAX_YAML_NODES` nodes, and YAML that nests too deeply
    or expands to too many nodes through aliases (checked before anything is expanded, so
    a hostile file fails fast).
    """
    source = str(path)
    policy = Policy.from_yaml_text(_read(path), source)
    resolve_calibrated(policy)
    return policy


def _read(path: str | Path) -> bytes:
    """The file's bytes, read no further than :data:`MAX_POLICY_BYTES` + 1: a larger file
    is refused (naming its size) before anything is parsed, and never read whole."""
    source = str(path)
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(MAX_POLICY_BYTES + 1)
            if len(data) > MAX_POLICY_BYTES:
                size = os.fstat(fh.fileno()).st_size  # 0 for a pipe or a device
                reason = too_large_reason(size if size >= len(data) else None)
                raise policy_error(source, ROOT, reason)
            return data
    except FileNotFoundError:
        raise policy_error(source, ROOT, "file not found") from None
    except IsADirectoryError:
        raise policy_error(source, ROOT, "is a directory, not a policy file") from None
    except OSError as exc:
        raise policy_error(source, ROOT, f"cannot read: {exc.strerror or exc}") from None


def check_policy_file(path: str | Path) -> Policy:
    """:func:`load_policy` and :func:`check_policy_references` at once, reporting *every*
    problem of the file together (what ``ssd-guard check-policy`` runs): the schema's (all
    of them: a duplicate rule name is reported beside a broken rule), a ``student`` /
    ``proxy_model`` that cannot be found (also when the rest is invalid), and the
    ``calibrated`` bounds (when the student is there to read them from). Raises
    :class:`~ssd_guard.errors.PolicyError`, one ``FILE: KEY.PATH: reason`` line each."""
    from ssd_guard.errors import PolicyError

    source, data = str(path), _read(path)
    where = Path(path).parent
    lines: dict[str, int] = {}
    raw = parse_policy_yaml(data, source, key_lines=lines)  # a YAML problem ends it here
    try:
        policy = Policy._from_parsed(data, raw, source, lines)
    except PolicyError as exc:
        problems = list(getattr(exc, "problems", []))
        # the references, read from the raw mapping
        student = raw.get("student", "bundled") if isinstance(raw, dict) else None
        proxy = raw.get("proxy_model") if isinstance(raw, dict) else None
        refs = _reference_problems(
            student if isinstance(student, str) and student else "bundled",
            proxy if isinstance(proxy, str) and proxy else None,
            where,
        )
        if not problems or not refs:
            raise
        raise policy_errors(source, [*problems, *(r for r in refs if r not in problems)]) from None
    problems = _reference_problems(policy.student, policy.proxy_model, where)
    if not any(key == "student" for key, _ in problems):
        try:
            resolve_calibrated(policy)
        except PolicyError as exc:
            problems.extend(getattr(exc, "problems", [(ROOT, str(exc))]))
    if problems:
        raise policy_errors(source, problems)
    return policy


def resolve_calibrated(policy: Policy, base_dir: str | Path | None = None) -> None:
    """Resolve every ``calibrated: {max_error, confidence}`` bound against the calibration
    file beside the policy's student (``ssd-guard calibrate``). Raises
    :class:`~ssd_guard.errors.PolicyError` when the file is missing, belongs to another
    student, calibrates another signal, or guarantees less than the rule asks."""
    leaves = [
        (index, path, metric, threshold)
        for index, rule in enumerate(policy.rules)
        if rule.when is not None
        for path, metric, threshold in rule.when.leaves()
        if threshold.calibrated is not None
    ]
    if not leaves:
        return
    from ssd_guard.artifact import bundled_artifact_path, load_artifact
    from ssd_guard.calibration import (
        CALIBRATION_FILENAME,
        CalibrationFile,
        calibration_filename,
        describe_guarantee,
        load_calibration,
    )
    from ssd_guard.errors import ArtifactError, ConfigError

    student = resolve_student(policy, base_dir)
    art = bundled_artifact_path() if student == "bundled" else Path(student)
    try:
        fingerprint = load_artifact(art)[0].fingerprint
    except (ConfigError, ArtifactError) as exc:
        raise policy_errors(policy.source, [("student", str(exc))]) from None
    files: dict[str, CalibrationFile] = {}

    def calibration_for(metric: str) -> CalibrationFile:
        # calibration-<signal>.json beside the student, else the plain calibration.json
        if metric not in files:
            own = art / calibration_filename(metric)
            files[metric] = load_calibration(
                own if own.is_file() else art / CALIBRATION_FILENAME, fingerprint=fingerprint
            )
        return files[metric]

    problems: list[tuple[str, str]] = []
    for index, path, metric, threshold in leaves:
        want = threshold.calibrated
        assert want is not None
        key = format_path(("rules", index, "when", *path, "calibrated"))
        try:
            cal = calibration_for(metric)
        except ConfigError as exc:
            problems.append((key, str(exc)))
            continue
        if cal.signal != metric:
            problems.append((key, f"the calibration file calibrates {cal.signal}, not {metric}"))
            continue
        if cal.alpha > want.max_error + 1e-12 or 1 - cal.delta < want.confidence - 1e-12:
            problems.append(
                (
                    key,
                    f"the student's calibration guarantees an error <= {cal.alpha:g} with "
                    f"confidence {1 - cal.delta:g}, the rule asks <= {want.max_error:g} with "
                    f"confidence {want.confidence:g}: re-run `ssd-guard calibrate --alpha "
                    f"{want.max_error:g} --delta {1 - want.confidence:.3g}` (it names the "
                    "smallest feasible alpha when the target cannot be met)",
                )
            )
            continue
        if want.abstain_max_right is not None:
            if cal.abstain_threshold is None or cal.abstain_beta is None:
                problems.append(
                    (
                        key,
                        "the calibration file has no abstain threshold: re-run `ssd-guard "
                        f"calibrate --abstain-beta {want.abstain_max_right:g}`",
                    )
                )
                continue
            if cal.abstain_beta > want.abstain_max_right + 1e-12:
                problems.append(
                    (
                        key,
                        f"the calibration's abstain region guarantees at most "
                        f"{cal.abstain_beta:g} right answers, the rule asks "
                        f"{want.abstain_max_right:g}: re-run `ssd-guard calibrate "
                        f"--abstain-beta {want.abstain_max_right:g}`",
                    )
                )
                continue
            op = "ge" if cal.higher_is_riskier else "le"
            threshold.resolve_calibrated(op, cal.abstain_threshold, describe_guarantee(cal))
            continue
        op = "gt" if cal.higher_is_riskier else "lt"
        threshold.resolve_calibrated(op, cal.threshold, describe_guarantee(cal))
    if problems:
        raise policy_errors(policy.source, problems)


def default_policy_path(name: str = "default") -> Path:
    """``policies/<name>.yaml`` of a source checkout, else the copy shipped in the package
    (``default`` and ``rag`` ship)."""
    repo_copy = Path(__file__).resolve().parents[2] / "policies" / f"{name}.yaml"
    if repo_copy.is_file():
        return repo_copy
    with resources.as_file(resources.files("ssd_guard.policies") / f"{name}.yaml") as p:
        return Path(p)


def load_default_policy() -> Policy:
    """The policy that ships with ssd-guard (see ``policies/default.yaml``)."""
    return load_policy(default_policy_path())


# --------------------------------------------------------------------------------------
# What the policy names
# --------------------------------------------------------------------------------------
def _candidates(name: str, base_dir: Path | None) -> list[Path]:
    """Where a relative path in a policy may point: beside the policy file, then the
    working directory."""
    path = Path(name).expanduser()
    if path.is_absolute() or base_dir is None:
        return [path]
    out = [base_dir / path, path]
    return [p for i, p in enumerate(out) if p not in out[:i]]


def _base_dir(policy: Policy, base_dir: str | Path | None) -> Path | None:
    if base_dir is not None:
        return Path(base_dir)
    source = Path(policy.source)
    if not policy.source.startswith("<") and source.is_file():
        return source.parent
    return None


def _student_problem(student: str, base_dir: Path | None) -> str | None:
    if student == "bundled":
        return None
    from ssd_guard.artifact import MANIFEST, WEIGHTS

    places = _candidates(student, base_dir)
    for place in places:
        if place.is_dir():
            lacking = [f for f in (MANIFEST, WEIGHTS) if not (place / f).is_file()]
            if not lacking:
                return None
            return (
                f"{str(place)!r} is not a student artifact directory "
                f"(no {' or '.join(lacking)}); use 'bundled' or a directory written by "
                "ssd-guard distill"
            )
    looked = ", ".join(repr(str(p)) for p in places)
    return f"student artifact not found (looked for {looked}); use 'bundled' or a directory"


def _in_hf_cache(model_id: str) -> bool:
    """Whether *model_id* is a Hugging Face model in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    with contextlib.suppress(Exception):  # an invalid repo id raises its own error
        found = try_to_load_from_cache(repo_id=model_id, filename="config.json")
        return isinstance(found, str)
    return False


def _proxy_problem(proxy: str | None, base_dir: Path | None) -> str | None:
    if proxy is None:
        return None
    from ssd_guard.models import BUNDLED_MODELS, canonical_model_name

    if canonical_model_name(proxy) in BUNDLED_MODELS:
        return None
    for place in _candidates(proxy, base_dir):
        if (place / "config.json").is_file():
            return None
    if _in_hf_cache(proxy):
        return None
    known = ", ".join(sorted(BUNDLED_MODELS))
    return (
        f"unknown model {proxy!r}: not a bundled model ({known}, or an alias), a local "
        "model directory with config.json, or a Hugging Face model in the local cache"
    )


def resolve_student(policy: Policy, base_dir: str | Path | None = None) -> str:
    """Where the policy's ``student`` is: ``"bundled"`` or an artifact directory (a
    relative path is looked up beside the policy file, then in the working directory).
    Raises :class:`~ssd_guard.errors.PolicyError` when there is no such artifact."""
    if policy.student == "bundled":
        return "bundled"
    where = _base_dir(policy, base_dir)
    problem = _student_problem(policy.student, where)
    if problem is not None:
        raise policy_errors(policy.source, [("student", problem)])
    from ssd_guard.artifact import MANIFEST

    for place in _candidates(policy.student, where):
        if (place / MANIFEST).is_file():
            return str(place)
    raise policy_errors(policy.source, [("student", "student artifact not found")])


def resolve_proxy_model(policy: Policy, base_dir: str | Path | None = None) -> str | None:
    """The policy's ``proxy_model`` as :func:`ssd_guard.models.load_causal_lm` takes it (a
    relative directory resolved like the student's), or ``None``."""
    proxy = policy.proxy_model
    if proxy is None:
        return None
    for place in _candidates(proxy, _base_dir(policy, base_dir)):
        if (place / "config.json").is_file():
            return str(place)
    return proxy


def check_policy_references(policy: Policy, base_dir: str | Path | None = None) -> None:
    """Refuse a ``student`` or ``proxy_model`` that does not exist (nothing is loaded).

    ``student`` must be ``bundled`` or a student artifact directory; ``proxy_model`` a
    bundled model id or alias (see :data:`ssd_guard.models.BUNDLED_MODELS`), a local model
    directory, or a model in the local Hugging Face cache. Relative paths are looked up
    beside the policy file (or *base_dir*), then in the working directory. Raises
    :class:`~ssd_guard.errors.PolicyError` as ``FILE: student: reason`` /
    ``FILE: proxy_model: reason``.
    """
    problems = _reference_problems(policy.student, policy.proxy_model, _base_dir(policy, base_dir))
    if problems:
        raise policy_errors(policy.source, problems)


def _reference_problems(
    student: str, proxy: str | None, where: Path | None
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    student_problem = _student_problem(student, where)
    if student_problem is not None:
        problems.append(("student", student_problem))
    proxy_problem = _proxy_problem(proxy, where)
    if proxy_problem is not None:
        problems.append(("proxy_model", proxy_problem))
    return problems
