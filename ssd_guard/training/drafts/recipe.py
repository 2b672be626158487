"""The draft-model recipe (``ssd-guard distill-drafts --config``), validated by pydantic.

It reads a finished ``ssd-guard distill`` work directory (``data_dir``: prompts, split,
labels and the target's sampled answers) and writes its own work directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ssd_guard.training.distill.recipe import ModelRecipe, load_recipe_file

__all__ = ["DraftRecipe", "load_draft_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DraftDataConfig(_Strict):
    #: Train-split prompts used for distillation (a seeded random subset; null = all).
    #: The train-split prompts left over fit the logistic regression: the drafts never
    #: saw their answers, so their features are what the test split will look like.
    distill_prompts: int | None = Field(default=None, ge=2)
    #: Distil on the greedy answer and the K sampled answers (``all``) or the greedy one.
    responses: Literal["all", "default"] = "all"
    max_answer_tokens: int = Field(default=16, ge=1)
    #: Use prompts of these sources only (null: all).
    sources: list[str] | None = None
    seed: int = 0


class DraftConfig(_Strict):
    #: Target decoder layers a draft is built from (copied, then trained).
    layers: list[int] = [0, 1, 2]
    #: Data-Diverse Drafts: ``prompt_partitions x response_partitions`` drafts, each
    #: trained on one disjoint cell (a part of the prompts x a part of each prompt's
    #: answers). 2 x 3 = 6 drafts is the paper's recommended setting.
    prompt_partitions: int = Field(default=2, ge=1)
    response_partitions: int = Field(default=3, ge=1)


class TrainConfig(_Strict):
    steps: int = Field(default=300, ge=1)
    #: Prompts per step; every answer of the draft's cell for those prompts is in the batch.
    prompts_per_step: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup: int = Field(default=20, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    #: Also distil the target's distributions at the question tokens (beyond the answer
    #: tokens). Off by default: the head on every question position doubles the cost,
    #: and the scorer only reads answer positions.
    loss_on_question: bool = False
    #: Save a resumable checkpoint (weights + Adam state) every this many steps.
    checkpoint_every: int = Field(default=50, ge=1)
    seed: int = 0


class ProxyConfig(_Strict):
    """Online Stochastic Distillation: one more draft trained on all distillation data
    against a target whose last ``perturb_layers`` decoder layers (and head, if
    ``perturb_head``) get a fresh low-rank Gaussian perturbation at every step."""

    noise_scale: float = Field(default=0.05, ge=0)
    rank: int = Field(default=4, ge=1)
    perturb_layers: int = Field(default=2, ge=1)
    perturb_head: bool = True
    #: Steps of the proxy (null: ``train.steps``).
    steps: int | None = Field(default=None, ge=1)


class AggregateConfig(_Strict):
    """The logistic regression over sequence-level features (hallucination detection)."""

    features: list[Literal["eu_mean", "eu_max", "jsd_mean", "kl_mean"]] = [
        "eu_mean",
        "eu_max",
    ]
    #: Features enter as ``log(x + 1e-6)`` (EU values are positive and heavy-tailed).
    log_features: bool = True
    C: float = Field(default=1.0, gt=0)
    #: Train-split rows (not used in distillation) the regression is fitted on (null: all).
    fit_prompts: int | None = Field(default=None, ge=10)
    batch_size: int = Field(default=16, ge=1)


class DraftRecipe(ModelRecipe):
    #: The ``ssd-guard distill`` work directory holding prompts, split, labels, teacher.
    data_dir: str
    data: DraftDataConfig = DraftDataConfig()
    draft: DraftConfig = DraftConfig()
    train: TrainConfig = TrainConfig()
    proxy: ProxyConfig = ProxyConfig()
    aggregate: AggregateConfig = AggregateConfig()

    @model_validator(mode="after")
    def _layers(self) -> DraftRecipe:
        if not self.draft.layers or len(set(self.draft.layers)) != len(self.draft.layers):
            raise ValueError("draft.layers: give distinct target layer indices")
        return self

    @property
    def n_drafts(self) -> int:
        return self.draft.prompt_partitions * self.draft.response_partitions


def load_draft_recipe(path: str | Path) -> DraftRecipe:
    return load_recipe_file(path, DraftRecipe)
