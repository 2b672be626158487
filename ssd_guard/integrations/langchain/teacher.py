"""Any LangChain chat model as the distillation teacher (``teacher.backend: chat``).

:class:`ChatModelTeacher` is the :class:`~ssd_guard.training.distill.teacher_chat.AnswerSource`
a recipe names: per question, ``n_samples`` answers at ``temperature`` and a default
answer at ``default_temperature``, each question asked as a user message (after the
recipe's ``prompt.system``), the way the model is deployed. A model with an ``n`` field
(``ChatOpenAI`` and OpenAI-compatible servers) gets one request per question for all
samples (``n=K``); any other chat model gets one request per sample. Requests run
``concurrency`` at a time; each carries a seed derived from the shard's (``seed=``, for
models that take one), so a rerun against a deterministic server samples the same.

Recipe factories (``teacher.chat.factory``): :func:`openai_teacher` (an OpenAI-compatible
endpoint through ``langchain-openai``: ``options: {base_url, model, api_key}``) and
:func:`chat_model_teacher` (``options: {model: "module:function"}`` returning any
``BaseChatModel``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from ssd_guard.errors import require_extra
from ssd_guard.integrations.langchain._common import text_of
from ssd_guard.integrations.langchain._sampling import sampling_kwargs

__all__ = ["ChatModelTeacher", "chat_model_teacher", "openai_teacher"]


class ChatModelTeacher:
    """Sample a LangChain chat model for the teacher (see the module doc)."""

    def __init__(
        self,
        model: BaseChatModel,
        *,
        concurrency: int = 4,
        cache: str | Path | None = None,
        model_id: str | None = None,
    ) -> None:
        self.model = model
        self.concurrency = concurrency
        #: JSON-lines file of answers already drawn (keyed by the model, the question and
        #: every sampling setting, the seed included): an API teacher is slow and costs
        #: money, so a rerun, or a second recipe with another proxy, asks nothing twice.
        self.cache = None if cache is None else Path(cache)
        self.model_id = model_id or str(
            getattr(model, "model_name", None)
            or getattr(model, "model", None)
            or type(model).__name__
        )
        self._cached: dict[str, tuple[str, list[str]]] = {}
        self._lock = threading.Lock()
        if self.cache is not None and self.cache.exists():
            for line in self.cache.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._cached[row["key"]] = (row["default"], list(row["samples"]))
                except (ValueError, KeyError, TypeError):  # a torn last line: asked again
                    continue
        self.batched = "n" in type(model).model_fields  # n answers per request
        self.seeded = "seed" in type(model).model_fields

    def _ask(
        self,
        model: BaseChatModel,
        messages: list[BaseMessage],
        temperature: float,
        n: int,
        seed: int,
    ) -> list[str]:
        kw: dict[str, Any] = sampling_kwargs(model, {}, temperature) or {}
        if temperature <= 0:
            kw = {k: v for k, v in kw.items() if k != "do_sample"} | {"temperature": 0.0}
        if self.seeded:
            kw["seed"] = seed
        if self.batched:
            result = model.generate([messages], n=n, **kw)
            return [g.text for g in result.generations[0]]
        return [text_of(model.invoke(messages, **kw)) for _ in range(n)]

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
    ) -> list[tuple[str, list[str]]]:
        """Per question: ``(default answer, [n_samples samples])``."""
        model = self.model
        if "max_tokens" in type(model).model_fields:
            model = model.model_copy(update={"max_tokens": max_new_tokens})

        settings = [system, n_samples, temperature, default_temperature, max_new_tokens]

        def one(i: int) -> tuple[str, list[str]]:
            base = seed * 7919 + i * (n_samples + 1)
            key = hashlib.sha256(
                json.dumps([self.model_id, questions[i], *settings, base]).encode()
            ).hexdigest()
            if key in self._cached:
                return self._cached[key]
            msgs: list[BaseMessage] = [HumanMessage(content=questions[i])]
            if system:
                msgs.insert(0, SystemMessage(content=system))
            default = self._ask(model, msgs, default_temperature, 1, base)[0]
            got = (default, self._ask(model, msgs, temperature, n_samples, base + 1))
            self._remember(key, got)
            return got

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, range(len(questions))))

    def _remember(self, key: str, got: tuple[str, list[str]]) -> None:
        with self._lock:
            self._cached[key] = got
            if self.cache is not None:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                with self.cache.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "default": got[0], "samples": got[1]}) + "\n")


def openai_teacher(
    base_url: str,
    model: str,
    api_key: str | None = None,
    *,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    max_retries: int = 2,
    cache: str | None = None,
) -> ChatModelTeacher:
    """A teacher on an OpenAI-compatible endpoint (``langchain-openai``'s ``ChatOpenAI``;
    *api_key* defaults to ``OPENAI_API_KEY``, else a placeholder for a local server)."""
    require_extra("langchain_openai", "openai", "the OpenAI-compatible teacher")
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=base_url,
        model=model,
        api_key=api_key or os.environ.get("OPENAI_API_KEY") or "unused",  # type: ignore[arg-type]
        timeout=timeout_s,
        max_retries=max_retries,
    )
    return ChatModelTeacher(chat, concurrency=concurrency, cache=cache, model_id=model)


def chat_model_teacher(
    model: str, *, concurrency: int = 4, cache: str | None = None, **options: Any
) -> ChatModelTeacher:
    """A teacher on the chat model ``module:function(**options)`` returns."""
    module, _, name = model.partition(":")
    chat = getattr(importlib.import_module(module), name)(**options)
    if not isinstance(chat, BaseChatModel):
        raise TypeError(f"{model} returned {type(chat).__name__}, not a LangChain chat model")
    return ChatModelTeacher(chat, concurrency=concurrency, cache=cache)
