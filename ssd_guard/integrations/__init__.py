"""Framework integrations. Only this package imports LangChain, and only when asked:
``from ssd_guard.integrations import SSDGuard`` loads :mod:`.langchain` on first use."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AsyncSSDGuard",
    "GuardedChatModel",
    "LocalGuardedChatModel",
    "SSDGuard",
    "SSDGuardMiddleware",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ssd_guard.integrations import langchain  # needs the [langchain] extra

    return getattr(langchain, name)
