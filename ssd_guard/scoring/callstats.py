"""Per-call statistics: what one guarded call has computed, computed once.

A guarded call asks for the same expensive quantity several times: the prompt check
needs the prompt's hidden state (the student's input features, one truncated prefill of
the base model), and so do the document checks, the answer check and every answer check
after a regeneration. :class:`CallStats` is made once per call (by
:meth:`ssd_guard.guard.Guard.prepare`, a LangChain callback's chat-model start, the agent
middleware's turn...) and handed to every check of that call; a scorer that accepts it
(``stats=`` on :meth:`~ssd_guard.scoring.ssd.SSDScorer.score_prompts` /
:meth:`~ssd_guard.scoring.ssd.SSDScorer.answer_signals`) asks it for a statistic by name
and key, and only the first ask computes it -- the way lm-polygraph's stat calculators
fill one dictionary of statistics that every estimator of a generation reads.

``hidden_provider`` replaces the computation of the hidden states: a
:class:`~ssd_guard.local.GuardedLocalModel` passes one that hands over the state it
captured during the generation's *own* prefill, so the guard runs no forward pass of
its own at all.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CallStats", "HiddenProvider", "takes_stats"]

HiddenProvider = Callable[[list[str]], Any]
"""``formatted prompts -> [B, F] features``: the states of prompts the caller already ran
through the base model (e.g. a generation's prefill)."""


class CallStats:
    """The statistics of one guarded call (see the module doc).

    Attributes:
        hidden_provider: where hidden states come from instead of a truncated prefill.
        truncated: set when a prompt of this call was longer than the encoder's limit and
            was cut to its last ``max_tokens`` tokens before scoring (the guard puts
            ``truncated: true`` on the call's audit events from then on).
        forwards: truncated prefills of the base model run for this call (a batch counts
            once; states from ``hidden_provider`` are not counted).
    """

    def __init__(self, *, hidden_provider: HiddenProvider | None = None) -> None:
        self.hidden_provider = hidden_provider
        self.truncated = False
        self.forwards = 0
        self._values: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, stat: str, key: str) -> Any | None:
        """The value of *stat* for *key*, or ``None`` if it was not computed yet."""
        with self._lock:
            return self._values.get((stat, key))

    def compute(
        self, stat: str, keys: Sequence[str], calculator: Callable[[list[str]], Sequence[Any]]
    ) -> list[Any]:
        """The values of *stat* for *keys*, in order; the missing ones come from one call
        ``calculator(missing_keys)`` (one value per key, in order) and are kept."""
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if (stat, k) not in self._values]
        if missing:
            values = list(calculator(missing))
            if len(values) != len(missing):
                raise ValueError(
                    f"calculator of {stat!r} returned {len(values)} values for {len(missing)} keys"
                )
            with self._lock:
                for key, value in zip(missing, values, strict=True):
                    self._values.setdefault((stat, key), value)
        with self._lock:
            return [self._values[(stat, k)] for k in keys]

    def put(self, stat: str, key: str, value: Any) -> None:
        """Record a value computed elsewhere (e.g. a generation's token statistics)."""
        with self._lock:
            self._values[(stat, key)] = value

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def __repr__(self) -> str:
        return (
            f"CallStats({len(self)} values, forwards={self.forwards}, "
            f"truncated={self.truncated}, provider={self.hidden_provider is not None})"
        )


def takes_stats(fn: Callable[..., Any] | None) -> bool:
    """Whether *fn* (a scorer method) takes a call's :class:`CallStats` as ``stats=``.

    A bound method is looked up by its function, so the answer is cached per scorer
    class and no scorer is kept alive by the cache."""
    return _takes_stats(getattr(fn, "__func__", fn))


@functools.lru_cache(maxsize=256)
def _takes_stats(fn: Callable[..., Any] | None) -> bool:
    if fn is None:
        return False
    try:
        param = inspect.signature(fn).parameters.get("stats")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
