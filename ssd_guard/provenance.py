"""Whose hidden states the guard reads: ``hidden_state_source``, decided in one place.

Every audit event records ``hidden_state_source``:

``guarded-model``
    the hidden states are the guarded model's own: the model that answers *is* the
    scorer's base model (the same object, or the same weights by
    :func:`ssd_guard.models.model_fingerprint`);
``proxy:<model id>``
    a local model stands in for the one that answers (an API model, another local
    model): the scores describe the proxy, not the guarded model;
``scorer``
    nothing is known about a guarded model (a plain :class:`~ssd_guard.guard.Guard`
    used on its own).

:func:`resolve_hidden_state_source` is the only place this is decided;
:meth:`ssd_guard.guard.Guard.for_model` (used by :class:`~ssd_guard.local.GuardedLocalModel`
and by every LangChain integration) calls it. Nothing here imports LangChain: wrappers
are recognised by their attributes.
"""

from __future__ import annotations

from typing import Any

from ssd_guard.errors import ConfigError

__all__ = [
    "GUARDED_MODEL",
    "SCORER",
    "base_model_of",
    "model_name",
    "resolve_hidden_state_source",
    "validate_source",
]

GUARDED_MODEL = "guarded-model"
SCORER = "scorer"

#: Attribute set on wrappers that put the guard around a model held in ``.model``
#: (:class:`ssd_guard.integrations.langchain.GuardedChatModel`).
WRAPS_MODEL_ATTR = "_ssd_guard_wraps_model"


def validate_source(label: str) -> str:
    """*label* if it is a valid ``hidden_state_source``; else :class:`ConfigError`."""
    if label in (GUARDED_MODEL, SCORER) or (
        isinstance(label, str) and label.startswith("proxy:") and len(label) > 6
    ):
        return label
    raise ConfigError(
        f"hidden_state_source must be 'guarded-model', 'scorer' or 'proxy:<model id>', "
        f"got {label!r}"
    )


def _is_hf_model(obj: Any) -> bool:
    return hasattr(obj, "config") and callable(getattr(obj, "get_input_embeddings", None))


def base_model_of(model: Any) -> Any | None:
    """The local ``transformers`` model behind *model*, else ``None`` (API-only models).

    *model* is a Hugging Face model itself, or a LangChain ``ChatHuggingFace`` /
    ``HuggingFacePipeline``, possibly bound (``bind_tools`` / ``bind``: ``.bound``) or
    wrapped by the guard (``.model``)."""
    obj = model
    for _ in range(8):
        if _is_hf_model(obj):
            return obj
        if getattr(obj, WRAPS_MODEL_ATTR, False):
            obj = obj.model
            continue
        bound = getattr(obj, "bound", None)  # RunnableBinding
        if bound is not None and bound is not obj:
            obj = bound
            continue
        break
    llm = getattr(obj, "llm", None)
    pipe = getattr(llm if llm is not None else obj, "pipeline", None)
    hf = getattr(pipe, "model", None)
    return hf if hf is not None and hasattr(hf, "config") else None


def model_name(model: Any) -> str | None:
    """A readable id of *model* (``model_id`` / ``model_name`` / ``model`` / its type)."""
    for attr in ("model_id", "model_name", "model", "name_or_path"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    bound = getattr(model, "bound", None)
    if bound is not None and bound is not model:
        return model_name(bound)
    return type(model).__name__ if model is not None else None


def _scorer_base_model(scorer: Any) -> tuple[Any | None, str | None]:
    """(the scorer's in-memory base model, its recorded fingerprint), when it has them."""
    lm = getattr(getattr(scorer, "encoder", None), "model", None)
    manifest = getattr(scorer, "manifest", None)
    fp = getattr(getattr(manifest, "base_model", None), "fingerprint", None)
    if not isinstance(fp, str):
        fp = getattr(scorer, "base_fingerprint", None)
    return lm, fp if isinstance(fp, str) else None


def is_scorer_base_model(model: Any, scorer: Any) -> bool:
    """Whether *model* runs on the scorer's base model (same object or same weights)."""
    hf = base_model_of(model)
    if hf is None:
        return False
    base, fingerprint = _scorer_base_model(scorer)
    if base is not None and base is hf:
        return True
    if fingerprint:
        try:
            from ssd_guard.models import model_fingerprint

            return model_fingerprint(hf) == fingerprint
        except Exception:  # an exotic model without input embeddings: not the same
            return False
    return False


def resolve_hidden_state_source(
    scorer: Any,
    *,
    model: Any = None,
    explicit: str | None = None,
    proxy: bool = False,
) -> str:
    """The ``hidden_state_source`` of a guard around *model* (``None``: unknown).

    In order:

    1. *model* runs on the scorer's base model: ``guarded-model`` (a fact, whatever was
       claimed);
    2. an *explicit* label (validated) as given;
    3. *model* is another model: ``proxy:<scorer.model_id>``;
    4. no model known: ``proxy:<scorer.model_id>`` when *proxy* (the policy names a
       ``proxy_model``, or an integration guards a model it cannot see), else ``scorer``.
    """
    if model is not None and is_scorer_base_model(model, scorer):
        return GUARDED_MODEL
    if explicit:
        return validate_source(explicit)
    if model is not None or proxy:
        return f"proxy:{scorer.model_id}"
    return SCORER
