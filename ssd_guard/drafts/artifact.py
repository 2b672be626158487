"""Draft-EU artifacts: ``drafts.safetensors`` + ``manifest.json``, under the same rules
as student artifacts (:mod:`ssd_guard.artifact`): the manifest records the base model's
id and weight fingerprint and the sha256 of the weights file; loading verifies the hash
(:class:`~ssd_guard.errors.ArtifactIntegrityError`) and :func:`check_draft_compatible`
refuses another target (:class:`~ssd_guard.errors.ArtifactMismatchError`). Nothing is
pickled.

Only the trained parameters are stored: each draft's decoder layers and final norm
(``draft.<k>.<param>``, ``proxy.<param>``); embedding and head are the target's own
(frozen during training) and are taken from the target at load time. The logistic
regression is plain arrays (``lr.mean``, ``lr.scale``, ``lr.coef``, ``lr.intercept``)
and the validation values of the score are ``calibration.draft_eu``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ssd_guard._version import __version__
from ssd_guard.artifact import (
    BaseModelInfo,
    base_model_problem,
    read_verified,
    write_weights_and_manifest,
)
from ssd_guard.errors import ArtifactMismatchError

__all__ = [
    "DRAFT_FORMAT_VERSION",
    "DraftManifest",
    "check_draft_compatible",
    "load_draft_artifact",
    "save_draft_artifact",
]

DRAFT_FORMAT_VERSION = 1
WEIGHTS = "drafts.safetensors"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DraftPrompt(_Model):
    """The context the drafts were trained on: ``few_shot + template`` (the exact text
    the target sees), with ``{question}`` the bare question."""

    few_shot: str = ""
    template: str = "Question: {question}\nAnswer:"


class ProxyInfo(_Model):
    noise_scale: float
    rank: int
    perturb_layers: int
    perturb_head: bool


class AggregateInfo(_Model):
    features: list[str]
    log_features: bool


class DraftManifest(_Model):
    format_version: int = DRAFT_FORMAT_VERSION
    kind: str = "draft-eu"
    library_version: str = __version__
    created: str = ""
    base_model: BaseModelInfo
    #: target decoder layers each draft was built from
    layers: list[int]
    n_drafts: int
    prompt_partitions: int
    response_partitions: int
    proxy: ProxyInfo
    prompt: DraftPrompt = DraftPrompt()
    max_answer_tokens: int = 16
    aggregate: AggregateInfo
    storage_dtype: str = "bfloat16"
    training: dict[str, Any] = {}
    weights_sha256: str = ""

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(
            {k: v for k, v in self.model_dump(mode="json").items() if k not in ("created",)},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def save_draft_artifact(
    directory: str | Path, manifest: DraftManifest, tensors: dict[str, torch.Tensor]
) -> Path:
    """Write a draft-model artifact (the student's file layout and integrity rules)."""
    fmt = ("ssd-guard-drafts", DRAFT_FORMAT_VERSION)
    return write_weights_and_manifest(directory, manifest, tensors, fmt, weights_name=WEIGHTS)


def load_draft_artifact(directory: str | Path) -> tuple[DraftManifest, dict[str, torch.Tensor]]:
    return read_verified(
        Path(directory),
        DraftManifest,
        weights_name=WEIGHTS,
        format_version=DRAFT_FORMAT_VERSION,
        kind="draft-EU",
        manifest_label="draft-EU manifest",
        format_label="draft artifact",
    )


def check_draft_compatible(
    manifest: DraftManifest,
    *,
    model_id: str | None,
    fingerprint: str | None,
    hidden_size: int,
    num_layers: int,
) -> None:
    """Refuse drafts used with another target: they share its embedding and head and
    were distilled from its distributions, so with any other model the scores are
    meaningless."""
    bm = manifest.base_model
    problems = []
    base = base_model_problem(
        bm, model_id=model_id, fingerprint=fingerprint, made_from="drafts were distilled from"
    )
    if base:
        problems.append(base)
    if hidden_size != bm.hidden_size:
        problems.append(f"hidden size: drafts expect {bm.hidden_size}, model has {hidden_size}")
    if num_layers != bm.num_layers:
        problems.append(f"layers: drafts expect {bm.num_layers}, model has {num_layers}")
    if problems:
        raise ArtifactMismatchError("draft-EU artifact does not match: " + "; ".join(problems))
