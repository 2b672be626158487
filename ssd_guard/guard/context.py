"""How documents are put in the prompt given to ``generate`` (never in the scored text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_CONTEXT_TEMPLATE", "context_field", "format_context"]

#: How retrieved documents are put in the prompt (``{documents}`` is one ``[i] text`` line
#: per kept document, ``{question}`` the user's text). The question stays last so a
#: ``Question: ... Answer:`` template around the whole text still ends on the question.
DEFAULT_CONTEXT_TEMPLATE = (
    "Use the following context to answer the question.\n\n"
    "Context:\n{documents}\n\n"
    "Question: {question}"
)


def format_context(
    question: str, documents: Sequence[str], template: str = DEFAULT_CONTEXT_TEMPLATE
) -> str:
    """Put *documents* in front of *question* with *template* (no documents: the question)."""
    if not documents:
        return question
    lines = "\n".join(f"[{i}] {' '.join(doc.split())}" for i, doc in enumerate(documents, 1))
    return template.format(documents=lines, question=question)


def context_field(documents: Sequence[str]) -> dict[str, Any]:
    """``context_documents``: how many documents the model's prompt holds (audit)."""
    return {"context_documents": len(documents)} if documents else {}
