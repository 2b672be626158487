"""Shared test helpers (moved from test_local.py; used by several test modules)."""

from __future__ import annotations

from typing import Any


class PrefillCounter:
    """Counts forward passes of the base model over more than one token (prefills)."""

    def __init__(self, model: Any) -> None:
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _m: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.count += 1

    def close(self) -> None:
        self._handle.remove()
