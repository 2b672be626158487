"""Which call keywords make a wrapped model *sample* (for a regeneration after
``reject_answer``): :func:`sampling_kwargs`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.language_models import BaseLanguageModel
from langchain_core.runnables import Runnable, RunnableBinding

__all__ = ["sampling_kwargs"]


def _explicit_kwargs(fn: Callable[..., Any] | None) -> set[str]:
    """The keyword parameters *fn* names (a ``**kwargs`` catch-all names none)."""
    if fn is None:
        return set()
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds}


def _is_local_hf_pipeline(model: Any) -> bool:
    """A ``ChatHuggingFace`` over a ``HuggingFacePipeline``, or the pipeline LLM itself:
    the local ``transformers`` pipeline reads its generation settings from the call's
    ``pipeline_kwargs`` (a ``temperature=`` keyword is ignored there)."""
    llm = getattr(model, "llm", None)
    pipe = getattr(llm if llm is not None else model, "pipeline", None)
    return pipe is not None and hasattr(getattr(pipe, "model", None), "config")


def sampling_kwargs(
    model: Runnable[Any, Any], call_kwargs: Mapping[str, Any], temperature: float
) -> dict[str, Any] | None:
    """The call keywords that make *model* sample at *temperature* (for a regeneration
    after ``reject_answer``), or ``None`` when it cannot be switched to sampling.

    * a local Hugging Face pipeline (``ChatHuggingFace`` / ``HuggingFacePipeline``):
      ``pipeline_kwargs={..., "do_sample": True, "temperature": T}`` (merged with the
      ``pipeline_kwargs`` already given or bound);
    * a chat model / LLM with a ``temperature`` field, or whose ``_generate`` names
      ``temperature`` / ``do_sample``: those keywords (LangChain hands a call's keywords
      to ``_generate``, as ``.bind(temperature=T)`` would);
    * any other Runnable (``RunnableLambda``, a chain...) only when its ``invoke`` names
      ``temperature`` / ``do_sample`` itself; otherwise ``None``: nothing is passed.

    ``bind`` / ``bind_tools`` bindings are looked through.
    """
    obj: Any = model
    layers: list[Mapping[str, Any]] = [call_kwargs]
    for _ in range(8):
        if not isinstance(obj, RunnableBinding):
            break
        layers.append(obj.kwargs)
        obj = obj.bound
    if _is_local_hf_pipeline(obj):
        given: dict[str, Any] = {}
        for layer in reversed(layers):  # the outer layers win, as in RunnableBinding
            given.update(layer.get("pipeline_kwargs") or {})
        return {"pipeline_kwargs": {**given, "do_sample": True, "temperature": temperature}}
    if isinstance(obj, BaseLanguageModel):
        names = _explicit_kwargs(getattr(obj, "_generate", None))
        if "temperature" in type(obj).model_fields:
            names.add("temperature")
    else:
        names = _explicit_kwargs(getattr(obj, "invoke", None))
    out: dict[str, Any] = {}
    if "temperature" in names:
        out["temperature"] = temperature
    if "do_sample" in names:
        out["do_sample"] = True
    return out or None
