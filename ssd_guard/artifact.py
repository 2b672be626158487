"""Student artifacts: a directory with ``model.safetensors`` and ``manifest.json``.

The safetensors file holds every tensor (student heads, input standardisation, PCA,
calibration values); the manifest records what the student was trained for and the
sha256 of the weights file. Loading verifies the hash, and :func:`check_compatible`
refuses an artifact whose base model, hidden size or embedder differ from those it
is used with. Nothing is ever pickled.

A prompt is scored on at most :meth:`Manifest.prompt_token_limit` tokens (its last ones):
``prompt.max_tokens`` when the manifest records it, else
:data:`DEFAULT_MAX_PROMPT_TOKENS` capped at the base model's context.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from ssd_guard._version import __version__
from ssd_guard.errors import ArtifactError, ArtifactIntegrityError, ArtifactMismatchError
from ssd_guard.features import FeatureSpec

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "FORMAT_VERSION",
    "AnswerInfo",
    "BaseModelInfo",
    "EmbedderInfo",
    "HeadInfo",
    "Manifest",
    "base_model_problem",
    "bundled_artifact_path",
    "check_compatible",
    "file_in",
    "load_artifact",
    "read_verified",
    "save_artifact",
    "write_weights_and_manifest",
]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"

#: Prompt tokens scored when the manifest records no ``prompt.max_tokens``: a prompt
#: keeps its last 512 tokens (the end of the question, which the student reads). The
#: bundled student's formatted training prompts (3-shot prefix + question) are 70 tokens
#: long at the median and 208 at most (4,000 prompts), so 512 is 2.5x the longest prompt
#: it has seen, rounded up to a power of two; it is capped at the base model's context.
#: Longer prompts are outside what the student was trained on, and their prefill cost
#: grows with their length (a 200,000-character prompt took 53 s at the 8,192-token
#: context on 2 CPU cores; under a second at 512).
DEFAULT_MAX_PROMPT_TOKENS = 512


def file_in(path: str | Path, filename: str) -> Path:
    """*path* itself, or ``<path>/<filename>`` when *path* is a directory (an artifact
    directory holding a side file: ``calibration.json``, ``risk.safetensors``)."""
    p = Path(path)
    return p / filename if p.is_dir() else p


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BaseModelInfo(_Model):
    id: str
    fingerprint: str
    hidden_size: int
    num_layers: int


class EmbedderInfo(_Model):
    id: str
    dim: int


class HeadInfo(_Model):
    """One mixture head: ``risk`` (entropy, d=16) or ``answer`` (log-likelihood, d=32)."""

    dim: int
    n_components: int
    hidden: int
    depth: int
    min_scale: float
    val_nll: float
    #: the head's target space: whitened PCA coordinates (``True``) or plain ones
    whitened: bool = True


def _without_new_defaults(model: BaseModel, added: dict[str, Any]) -> dict[str, Any]:
    """*model*'s fields, leaving out fields added after format 1 while they hold their
    default: an artifact that does not use them keeps its fingerprint."""
    out = model.model_dump(mode="json")
    for key, default in added.items():
        if out.get(key) == default:
            out.pop(key, None)
    return out


class PromptFormat(_Model):
    few_shot: str = ""
    template: str = "Question: {question}\nAnswer:"
    #: The student was distilled on chat-templated prompts: the question is the user
    #: message (after ``system`` when set) in the base model's own chat template;
    #: ``few_shot`` / ``template`` are then unused.
    chat: bool = False
    system: str | None = None
    #: Most prompt tokens the student is scored on (the formatted prompt's *last* ones);
    #: ``None``: :data:`DEFAULT_MAX_PROMPT_TOKENS`, capped at the base model's context.
    #: Optional (added after format 1): a manifest without it reads as before.
    max_tokens: int | None = Field(default=None, ge=1)


class AnswerInfo(_Model):
    """How candidate answers are turned into the answer head's targets."""

    #: Answer texts are normalised before embedding (first line, boilerplate such as
    #: "The answer is" and a final period stripped), at distillation and at run time.
    normalise: bool = False
    #: A sentence-length answer is also scored on its *core*: the words that do not
    #: repeat the question, and the best of both counts (phrasing robustness).
    core_span: bool = False
    #: The artifact holds an unconditional answer density (``marginal.*`` tensors), so
    #: pointwise mutual information ``log p(a | prompt) - log p(a)`` can be scored.
    marginal: bool = False
    #: The answer signal the student was validated for (``loglik``, ``pmi`` or
    #: ``consensus``): the evaluation's mismatch / multiple-choice default.
    default_signal: Literal["loglik", "pmi", "consensus"] = "loglik"
    #: Answers are embedded by their core (:func:`ssd_guard.answers.answer_core`: what
    #: they say beyond restating the question) at distillation and at run time.
    core_embed: bool = False


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    library_version: str = __version__
    created: str = ""
    base_model: BaseModelInfo
    #: the deepest layer the student reads (the truncated prefill stops there)
    layer: int
    #: what the student reads; ``None`` = the last token's state at ``layer``
    features: FeatureSpec | None = None
    embedder: EmbedderInfo
    pca_dim: int
    heads: dict[str, HeadInfo]
    prompt: PromptFormat = PromptFormat()
    answers: AnswerInfo = AnswerInfo()
    training: dict[str, Any] = {}
    weights_sha256: str = ""

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.features or FeatureSpec.single(self.layer)

    def prompt_token_limit(self, context: int | None = None) -> int:
        """Most prompt tokens to score: ``prompt.max_tokens`` when recorded, else
        :data:`DEFAULT_MAX_PROMPT_TOKENS`; never more than *context* (the base model's
        ``max_position_embeddings``) when given."""
        limit = self.prompt.max_tokens or DEFAULT_MAX_PROMPT_TOKENS
        return min(limit, context) if context else limit

    @property
    def fingerprint(self) -> str:
        """Identifies what the scores depend on: the weights *and* every manifest field
        that changes a score (layer, features, prompt format, heads, answer handling,
        embedder, base model). Shared caches key on it."""
        relevant = {
            "weights": self.weights_sha256,
            "layer": self.layer,
            "features": self.feature_spec.model_dump(mode="json"),
            "prompt": _without_new_defaults(
                self.prompt, {"chat": False, "system": None, "max_tokens": None}
            ),
            "heads": {k: v.model_dump(mode="json") for k, v in sorted(self.heads.items())},
            "answers": _without_new_defaults(self.answers, {"core_embed": False}),
            "embedder": self.embedder.model_dump(mode="json"),
            "pca_dim": self.pca_dim,
            "base_model": self.base_model.model_dump(mode="json"),
        }
        blob = json.dumps(relevant, sort_keys=True).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_M = TypeVar("_M", bound=BaseModel)


def write_weights_and_manifest(
    directory: str | Path,
    manifest: _M,
    tensors: dict[str, torch.Tensor],
    fmt: tuple[str, int],
    weights_name: str = "model.safetensors",
) -> Path:
    """Write ``weights_name`` (safetensors, its metadata naming the format *fmt*:
    ``(name, version)``) then ``manifest.json`` holding the weights' sha256 (and
    ``created``, when the manifest has none), each atomically."""
    metadata = {"format": fmt[0], "format_version": str(fmt[1])}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / weights_name
    tmp = weights.with_name(weights_name + ".tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, weights)
    data = manifest.model_copy(
        update={
            "weights_sha256": _sha256_file(weights),
            "created": getattr(manifest, "created", "")
            or datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    tmp_m = out / (MANIFEST + ".tmp")
    tmp_m.write_text(json.dumps(data.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_m, out / MANIFEST)
    return out


def read_verified(
    path: Path,
    manifest_type: type[_M],
    *,
    weights_name: str,
    format_version: int,
    kind: str,
    manifest_label: str = "manifest",
    format_label: str = "artifact",
) -> tuple[_M, dict[str, torch.Tensor]]:
    """Read ``manifest.json`` + ``weights_name`` from ``path``: refuse a missing file
    (``not a <kind> artifact``), an invalid manifest, a format newer than
    ``format_version`` and weights whose sha256 differs from the manifest's
    (:class:`ArtifactIntegrityError`)."""
    mpath, wpath = path / MANIFEST, path / weights_name
    if not mpath.exists() or not wpath.exists():
        raise ArtifactError(f"{path}: not a {kind} artifact (needs {MANIFEST} and {weights_name})")
    try:
        manifest = manifest_type.model_validate_json(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{mpath}: manifest is not UTF-8 text ({exc.reason})") from exc
    except ValidationError as exc:
        raise ArtifactError(f"{mpath}: invalid {manifest_label}: {exc}") from exc
    version = int(getattr(manifest, "format_version"))  # noqa: B009
    if version > format_version:
        raise ArtifactError(
            f"{path}: {format_label} format {version} is newer than this ssd-guard "
            f"({__version__}) understands ({format_version}); upgrade ssd-guard"
        )
    expected = str(getattr(manifest, "weights_sha256"))  # noqa: B009
    actual = _sha256_file(wpath)
    if actual != expected:
        raise ArtifactIntegrityError(
            f"{wpath}: sha256 {actual[:16]}… does not match the manifest's "
            f"{expected[:16]}…; the weights were modified or corrupted"
        )
    try:
        tensors = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{wpath}: unreadable safetensors file: {exc}") from exc
    return manifest, tensors


def save_artifact(
    directory: str | Path, manifest: Manifest, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``model.safetensors`` then ``manifest.json`` (with the weights' sha256)."""
    return write_weights_and_manifest(directory, manifest, tensors, ("ssd-guard", FORMAT_VERSION))


def bundled_artifact_path() -> Path:
    """The default student that ships inside the package (SmolLM2-135M-Instruct + MiniLM)."""
    return Path(__file__).parent / "bundled" / "smollm2-135m-instruct-minilm"


def load_artifact(directory: str | Path) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Read and verify an artifact directory (``"bundled"`` names the shipped one)."""
    path = bundled_artifact_path() if str(directory) == "bundled" else Path(directory)
    return read_verified(
        path, Manifest, weights_name=WEIGHTS, format_version=FORMAT_VERSION, kind="student"
    )


def check_compatible(
    manifest: Manifest,
    *,
    model_id: str | None = None,
    fingerprint: str | None = None,
    hidden_size: int | None = None,
    embedder_id: str | None = None,
    embedder_dim: int | None = None,
) -> None:
    """Refuse an artifact used with another base model, hidden size or embedder."""
    problems = []
    bm = manifest.base_model
    if hidden_size is not None and hidden_size != bm.hidden_size:
        problems.append(f"hidden size: artifact expects {bm.hidden_size}, model has {hidden_size}")
    base = base_model_problem(
        bm, model_id=model_id, fingerprint=fingerprint, made_from="artifact was trained on"
    )
    if base:
        problems.append(base)
    if embedder_dim is not None and embedder_dim != manifest.embedder.dim:
        problems.append(
            f"embedder dim: artifact expects {manifest.embedder.dim}, embedder has {embedder_dim}"
        )
    if embedder_id is not None and _norm_id(embedder_id) != _norm_id(manifest.embedder.id):
        problems.append(f"embedder: artifact expects {manifest.embedder.id}, got {embedder_id}")
    if problems:
        raise ArtifactMismatchError("student artifact does not match: " + "; ".join(problems))


def base_model_problem(
    bm: BaseModelInfo, *, model_id: str | None, fingerprint: str | None, made_from: str
) -> str | None:
    """What is wrong with using weights made from ``bm`` with the model ``model_id`` /
    ``fingerprint`` (the fingerprint decides when given), or ``None``. ``made_from``
    phrases the origin, e.g. ``"artifact was trained on"``."""
    if fingerprint is not None and fingerprint != bm.fingerprint:
        return (
            f"base model: {made_from} {bm.id} (fingerprint {bm.fingerprint}), "
            f"got {model_id or 'a model'} with fingerprint {fingerprint}"
        )
    if fingerprint is None and model_id is not None and model_id != bm.id:
        return f"base model: {made_from} {bm.id}, got {model_id}"
    return None


def _norm_id(s: str) -> str:
    return s.lower().rsplit("/", 1)[-1]
