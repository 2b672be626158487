"""Reading a student artifact for :class:`~ssd_guard.scoring.ssd.SSDScorer`: its heads,
answer PCA and marginal density, each checked against the manifest, and its prompt format
(:func:`read_student`, :func:`apply_prompt_format`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from ssd_guard.artifact import Manifest, bundled_artifact_path, load_artifact
from ssd_guard.encoding import PCAProjection
from ssd_guard.errors import ArtifactError
from ssd_guard.mixture import GaussianMixture
from ssd_guard.scoring.risk import RiskModel, load_risk_model
from ssd_guard.student import SSDStudent


def load_marginal(tensors: dict[str, torch.Tensor]) -> GaussianMixture | None:
    """The unconditional answer density stored as ``marginal.{weights,means,scales}``."""
    keys = ("marginal.weights", "marginal.means", "marginal.scales")
    present = [k for k in keys if k in tensors]
    if not present:
        return None
    if len(present) != len(keys):
        missing = [k for k in keys if k not in tensors]
        raise ArtifactError(f"artifact holds an incomplete marginal density: no {missing}")
    try:
        return GaussianMixture(
            tensors["marginal.weights"].float().unsqueeze(0),
            tensors["marginal.means"].float().unsqueeze(0),
            tensors["marginal.scales"].float().unsqueeze(0),
        )
    except (RuntimeError, ValueError) as exc:
        raise ArtifactError(f"artifact's marginal density is malformed: {exc}") from exc


def bare_question(prompt: str) -> str:
    """The question of a prompt given bare or in ``Question: ...\nAnswer:`` form."""
    text = prompt.strip()
    if text.startswith("Question:"):
        text = text[len("Question:") :].strip()
    if text.endswith("Answer:"):
        text = text[: -len("Answer:")].strip()
    return text


def apply_prompt_format(prompt: str, few_shot: str, template: str) -> str:
    """``few_shot`` + ``template`` with ``{question}`` the prompt's question: the prompt
    may be a bare question or already in ``Question: ...\nAnswer:`` form."""
    return few_shot + template.replace("{question}", bare_question(prompt))


def build_heads(
    manifest: Manifest, tensors: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> dict[str, SSDStudent]:
    heads = {}
    for name, info in manifest.heads.items():
        prefix = f"heads.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            raise ArtifactError(f"artifact lists head {name!r} but holds no tensors for it")
        config: dict[str, Any] = {
            "in_dim": manifest.feature_spec.in_dim(manifest.base_model.hidden_size),
            "out_dim": info.dim,
            "n_components": info.n_components,
            "hidden": info.hidden,
            "depth": info.depth,
            "min_scale": info.min_scale,
            "val_nll": info.val_nll,
        }
        try:
            heads[name] = SSDStudent.from_state(config, state, device=device)
        except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict(strict=True)
            detail = str(exc).strip().splitlines()
            raise ArtifactError(
                f"artifact head {name!r}: its tensors do not have the shapes the manifest "
                f"gives (in_dim={config['in_dim']}, dim={info.dim}, "
                f"n_components={info.n_components}, hidden={info.hidden}, "
                f"depth={info.depth}): {detail[-1] if detail else type(exc).__name__}"
            ) from exc
    return heads


def _student_parts(
    manifest: Manifest, tensors: dict[str, torch.Tensor], device: torch.device | str | None
) -> tuple[dict[str, SSDStudent], PCAProjection, GaussianMixture | None]:
    """The heads, answer PCA and marginal density of an artifact, each checked against
    the manifest (:class:`ArtifactError` with what does not match)."""
    n_layers = manifest.base_model.num_layers
    beyond = [ly for ly in manifest.feature_spec.all_layers if ly > n_layers]
    if beyond:
        raise ArtifactError(
            f"artifact reads layer {beyond[0]}, but its base model {manifest.base_model.id} "
            f"has {n_layers} layers (0..{n_layers})"
        )
    keys = ("pca.mean", "pca.components", "pca.scale")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ArtifactError(f"artifact holds no answer PCA: no {missing}")
    try:
        pca = PCAProjection.from_tensors(tensors)
    except ValueError as exc:
        raise ArtifactError(f"artifact's answer PCA is malformed: {exc}") from exc
    if pca.input_dim != manifest.embedder.dim:
        raise ArtifactError(
            f"artifact's answer PCA reads {pca.input_dim}-dim embeddings, but the manifest's "
            f"embedder {manifest.embedder.id} has dim {manifest.embedder.dim}"
        )
    for name, info in manifest.heads.items():
        if info.dim > pca.dim:
            raise ArtifactError(
                f"artifact head {name!r} has dim {info.dim}, more than the answer PCA's "
                f"{pca.dim} components"
            )
    heads = build_heads(manifest, tensors, device=device)
    return heads, pca, load_marginal(tensors)


class StudentArtifact(NamedTuple):
    """An artifact read and checked by :func:`read_student`."""

    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    risk_model: RiskModel | None


def read_student(artifact: str | Path = "bundled") -> StudentArtifact:
    """Read an artifact and run every check of :meth:`SSDScorer.load` that needs no base
    model: a valid manifest of a known format, weights matching its sha256, the PCA,
    heads (with the shapes the manifest gives) and marginal density it names, and a
    ``risk.safetensors`` fitted for this very student (fingerprint). Raises
    :class:`~ssd_guard.errors.ArtifactError` (or a subclass) with what is wrong."""
    manifest, tensors = load_artifact(artifact)
    path = bundled_artifact_path() if str(artifact) == "bundled" else Path(artifact)
    _student_parts(manifest, tensors, "cpu")
    return StudentArtifact(path, manifest, tensors, load_risk_model(path, manifest.fingerprint))
