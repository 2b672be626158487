"""The teacher of ``teacher.backend: chat``: answers from a chat model (an API model),
hidden states from the recipe's ``base_model`` as its local proxy.

Per shard, the chat model is asked each question (the bare question, without the recipe's
``Question: ... Answer:`` frame, as the user message, after ``prompt.system``)
``n_samples`` times at ``temperature`` plus once at ``default_temperature`` (its default
answer, the one the correctness labels grade); the
proxy then runs one prefill of the prompt text the student reads (``prompt.chat``: the
proxy's own chat template) and its states are stored as the hf teacher stores the base
model's. The student trained on such a work directory predicts *the chat model's* answer
distribution from the proxy's representation.

The answer source is named by the recipe (``teacher.chat.factory``, ``module:function``),
so the offline side depends on nothing but :class:`AnswerSource`: the LangChain one is
:mod:`ssd_guard.integrations.langchain.teacher`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ssd_guard.answers import question_of
from ssd_guard.errors import ConfigError
from ssd_guard.generation import first_line
from ssd_guard.training.distill.recipe import ChatTeacherConfig, Recipe
from ssd_guard.training.distill.teacher import prefill_shard

__all__ = ["AnswerSource", "load_answer_source", "sample_shard_chat"]


@runtime_checkable
class AnswerSource(Protocol):
    """What answers the teacher's questions: per question, its default answer and
    ``n_samples`` samples (raw texts; the teacher keeps each one's first line)."""

    def sample(
        self,
        questions: Sequence[str],
        *,
        system: str | None,
        n_samples: int,
        temperature: float,
        default_temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[tuple[str, list[str]]]: ...


def load_answer_source(cfg: ChatTeacherConfig) -> AnswerSource:
    """Call ``cfg.factory`` (``module:function``) with ``cfg.options``."""
    module, _, name = cfg.factory.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"teacher.chat.factory {cfg.factory!r}: {exc}") from exc
    source = factory(**cfg.options)
    if not isinstance(source, AnswerSource):
        raise ConfigError(
            f"teacher.chat.factory {cfg.factory!r} returned {type(source).__name__}, which "
            "has no sample(questions, ...) method"
        )
    return source


def sample_shard_chat(
    source: AnswerSource, lm: Any, recipe: Recipe, index: int, chunk: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Teacher shard *index* of ``backend: chat``: the chat model's answers (seeded per
    shard, as the hf teacher is) and the proxy *lm*'s states of the same prompts."""
    t = recipe.teacher
    answers = source.sample(
        [question_of(str(row["prompt"])) for row in chunk],
        system=recipe.prompt.system,
        n_samples=t.n_samples,
        temperature=t.temperature,
        default_temperature=t.default_temperature,
        max_new_tokens=t.max_new_tokens,
        seed=t.seed * 1_000_003 + index,
    )
    if len(answers) != len(chunk) or any(len(s) != t.n_samples for _, s in answers):
        raise RuntimeError(
            f"the chat teacher gave {len(answers)} answer sets for {len(chunk)} questions "
            f"(each must hold {t.n_samples} samples)"
        )
    records = [
        {"id": row["id"], "default": first_line(d), "samples": [first_line(x) for x in smp]}
        for row, (d, smp) in zip(chunk, answers, strict=True)
    ]
    return records, prefill_shard(lm, recipe, chunk)
