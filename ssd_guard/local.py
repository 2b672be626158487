"""Generation under the guard's control: SSD scoring with zero extra forward pass.

When the model that answers is a local Hugging Face causal LM that the guard drives
itself, the prompt's layer-``l`` hidden state falls out of the generation's *own*
prefill. :class:`GuardedLocalModel` runs that prefill once (keeping the KV cache), hands
the captured state to the scorer (so the pre-generation check costs only the student
head), and, when the policy lets the call proceed, decodes the answer from the same KV
cache. The post-generation check reuses the same state too: only the answer embedder
runs. Compared with an unguarded generation the guard adds no forward pass of the base
model at all::

    guard = Guard(SSDScorer.load("bundled"), "policies/default.yaml")
    local = GuardedLocalModel(guard, max_new_tokens=24)
    res = local.invoke("Which planet is known as the Red Planet?")
    res.output, res.entropy, local.stats

Prompts are put in the artifact's prompt format (few-shot prefix + template, as during
distillation), so the hidden state is exactly the kind the student was trained on, and
answers are the first line of the continuation (short answers, like the teacher's).

The captured state reaches the scorer through the call's
:class:`~ssd_guard.scoring.callstats.CallStats` (its ``hidden_provider``): nothing is
shared between calls or threads. When the generation is *not* under the guard's control
(an API model, a LangChain chat model the guard only wraps) the scorer falls back to its
truncated prefill (layers ``<= l`` only): see :class:`ssd_guard.scoring.ssd.SSDScorer`.

For LangChain, :class:`ssd_guard.integrations.langchain.LocalGuardedChatModel` wraps a
:class:`GuardedLocalModel` (this module imports no integration).

Cost notes: when the policy abstains, the prefill that was run is a full one (the
truncated prefill would have stopped at layer ``l``). The guard scores the bare question
(see :mod:`ssd_guard.guard`): with documents in the prompt, the question's state costs
one prefill of the question besides the generation's own. A prompt longer than the
base model's context keeps its last tokens (the scorer's own, smaller limit applies to what it
scores, not to what the model generates from), and the call's events say ``truncated: true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Unpack

import torch

from ssd_guard.generation import decode_loop, left_pad_positions, stop_token_table
from ssd_guard.guard import Guard, GuardResult
from ssd_guard.scoring.callstats import CallStats, takes_stats
from ssd_guard.scoring.token_stats import CALLSTATS_KEY, TokenStatsAccumulator

__all__ = ["GuardedLocalModel", "LocalStats"]


@dataclass
class _Prefill:
    cache: Any
    logits: torch.Tensor  # [1, V] float32, last prompt position
    attn: torch.Tensor  # [1, T]
    next_pos: torch.Tensor  # [1, 1]


@dataclass
class _Session:
    """State of one guarded call: prefills waiting for their decode, captured states."""

    kv: dict[str, _Prefill] = field(default_factory=dict)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    stats: CallStats = field(default_factory=CallStats)


@dataclass
class LocalStats:
    """Counters of a :class:`GuardedLocalModel` (what the fast path saved)."""

    prefills: int = 0
    """full prefills run (each one both scores and, when allowed, starts a generation)"""
    decoded_from_scoring_prefill: int = 0
    """generations that decoded from the KV cache of the prefill the scorer used"""
    hidden_reuses: int = 0
    """states served from a prefill already run for the generation (a check after the
    generation; the answer check of a call reuses the prompt check's state through the
    call's CallStats and does not ask again)"""
    generations: int = 0
    long_prompt_scoring_passes: int = 0
    """truncated passes run because a prompt held more tokens than the student scores
    (the generation still reads the whole prompt, up to the model's context)"""
    model_seconds: float = 0.0
    """wall time spent in the base model (prefills + decode loops)"""


class InvokeKwargs(TypedDict, total=False):
    """The keywords of :meth:`GuardedLocalModel.invoke` (as in :meth:`Guard.run
    <ssd_guard.guard.Guard.run>`)."""

    documents: Sequence[str] | None
    source: Literal["retrieval", "tool", "cache"]
    tags: Sequence[str]
    run_name: str | None
    run_id: str | None
    parent_run_id: str | None


class GuardedLocalModel:
    """A local Hugging Face causal LM that generates under a :class:`Guard`.

    Args:
        guard: a guard whose scorer is an :class:`~ssd_guard.scoring.ssd.SSDScorer` (the
            base model it loaded is the model that generates).
        max_new_tokens: longest answer, in tokens (answers end at their first line).
        temperature: of the first generation (``0``: greedy, as the teacher's default
            answer).
        regen_temperature: of regenerations after ``reject_answer`` (``1.0``: the
            teacher's sampling temperature), so a rejected answer is not repeated.
        seed: seeds the sampling generator (regenerations), for reproducible runs.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        regen_temperature: float = 1.0,
        seed: int | None = None,
    ) -> None:
        scorer: Any = guard.scorer
        # A wrapper that cannot take the call's statistics (a BatchingScorer) would run a
        # prefill of its own: score with the scorer it wraps (the state here is free).
        while not takes_stats(getattr(scorer, "score_prompts", None)) and takes_stats(
            getattr(getattr(scorer, "scorer", None), "score_prompts", None)
        ):
            scorer = scorer.scorer
        missing = [
            attr for attr in ("encoder", "format_prompt", "hidden") if not hasattr(scorer, attr)
        ]
        if missing:
            raise TypeError(
                "GuardedLocalModel needs an SSDScorer-like scorer that holds the local base "
                f"model (missing: {', '.join(missing)}); got {type(scorer).__name__}"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.scorer: Any = scorer
        self.model = scorer.encoder.model
        self.tokenizer = scorer.encoder.tokenizer
        self.model_id = str(scorer.model_id)
        view = guard.for_model(self.model, name=self.model_id)
        if view.scorer is not scorer:
            view.scorer = scorer
        self.guard = view
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.regen_temperature = float(regen_temperature)
        self._device = next(self.model.parameters()).device
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator(device=self._device).manual_seed(seed)
        self._stop_table: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.stats = LocalStats()

    # ------------------------------------------------------------------ model work
    def _count(self, name: str, seconds: float = 0.0) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)
            self.stats.model_seconds += seconds

    def _stops(self) -> torch.Tensor:
        if self._stop_table is None:
            self._stop_table = stop_token_table(self.tokenizer, self._device)
        return self._stop_table

    @torch.inference_mode()
    def _prefill(
        self, text: str, *, capture: bool = True
    ) -> tuple[_Prefill, torch.Tensor | None, bool]:
        """One full prefill of *text* with a KV cache; with *capture*, also the student's
        features (``[1, F]`` float32) recorded by forward hooks; and whether *text* was cut
        to its last tokens: the base model's context, not the scorer's (smaller) limit, since
        this prompt is also what the model generates from."""
        t0 = time.perf_counter()
        # Cut like the scorer's own prefill (last tokens kept; counted and logged), at the
        # model's context: RAG documents in a generation prompt must not be lost.
        encoder = self.scorer.encoder
        enc, cut = encoder.tokenize_checked([text], max_tokens=encoder.context_tokens)
        ids = enc["input_ids"].to(self._device)
        attn = enc["attention_mask"].to(self._device)
        pos = left_pad_positions(attn)
        ctx = self.scorer.encoder.capture(attn) if capture else contextlib.nullcontext(None)
        with ctx as cap:
            # The capture hooks act only in this context: other threads' passes through
            # the same model are ignored, and nothing is ever raised into them.
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        hidden = cap.hidden if cap is not None else None
        pre = _Prefill(
            cache=out.past_key_values,
            logits=out.logits[:, -1, :].float(),
            attn=attn,
            next_pos=pos[:, -1:] + 1,
        )
        self._count("prefills", time.perf_counter() - t0)
        if capture and hidden is None:
            raise RuntimeError("the prefill did not reach the student's layer")
        return pre, hidden, bool(cut[0])

    @torch.inference_mode()
    def _decode(self, pre: _Prefill, temperature: float, stats: CallStats | None = None) -> str:
        t0 = time.perf_counter()
        greedy = temperature <= 0
        want = stats is not None and self.guard.needs_token_stats
        acc = TokenStatsAccumulator(1, self._device) if want else None
        tokens, lengths = decode_loop(
            self.model,
            pre.cache,
            pre.logits,
            pre.attn,
            pre.next_pos,
            temps=torch.full((1, 1), max(temperature, 1e-6), device=self._device),
            greedy_rows=torch.full((1,), greedy, dtype=torch.bool, device=self._device),
            max_new_tokens=self.max_new_tokens,
            stop_table=self._stops(),
            pad_token_id=int(self.tokenizer.pad_token_id),
            generator=self._generator,
            token_stats=acc,
        )
        raw = self.tokenizer.decode(tokens[0, : int(lengths[0])].tolist(), skip_special_tokens=True)
        text = str(raw).split("\n", 1)[0].strip()
        if acc is not None and stats is not None:
            # The generation's own token statistics, for the combined risk's post_gen
            # variant (free: the decode loop computed the logits anyway).
            stats.put(CALLSTATS_KEY, text, tuple(float(v) for v in acc.result()[0].tolist()))
        self._count("generations", time.perf_counter() - t0)
        return text

    def _prefill_into(self, text: str, session: _Session) -> tuple[_Prefill, torch.Tensor]:
        pre, h, cut = self._prefill(text)
        assert h is not None
        encoder = self.scorer.encoder
        if cut or encoder.too_long([text])[0]:
            # Longer than what the student scores: the model generates from the whole
            # prompt (up to its context), but the student reads the state of the kept last
            # tokens, as the scorer's own prefill would (one truncated pass, long prompts only).
            session.stats.truncated = True
            flags: list[bool] = []
            h = encoder.encode([text], cut=flags).float()
            self._count("long_prompt_scoring_passes")
        return pre, h

    def _hidden_for(self, texts: list[str], session: _Session) -> torch.Tensor:
        """The call's ``hidden_provider``: states captured by the generation's prefill
        (a prompt not prefilled yet is prefilled now, its KV cache kept for the decode)."""
        rows = []
        for text in texts:
            h = session.hidden.get(text)
            if h is None:
                pre, h = self._prefill_into(text, session)
                session.kv[text] = pre
                session.hidden[text] = h
            else:
                self._count("hidden_reuses")
            rows.append(h)
        return torch.cat(rows).to(self._device)

    def _generate(self, prompt: str, session: _Session, temperature: float | None = None) -> str:
        text = self.scorer.format_prompt(prompt)
        attempt = session.attempts[text]
        session.attempts[text] += 1
        pre = session.kv.pop(text, None)
        if pre is None:
            pre, h = self._prefill_into(text, session)
            session.hidden.setdefault(text, h)
        else:
            self._count("decoded_from_scoring_prefill")
        if temperature is None:
            temperature = self.temperature if attempt == 0 else self.regen_temperature
        return self._decode(pre, temperature, session.stats)

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: str, *, temperature: float | None = None) -> str:
        """An *unguarded* generation (prefill + decode, no hook, no scoring): the
        baseline the guard's overhead is measured against."""
        pre, _, _ = self._prefill(self.scorer.format_prompt(prompt), capture=False)
        return self._decode(pre, self.temperature if temperature is None else temperature)

    def invoke(self, prompt: str, **kw: Unpack[InvokeKwargs]) -> GuardResult:
        """Guard one generation (see :meth:`Guard.run`; keywords: :class:`InvokeKwargs`):
        check, act, generate, check, act, with the hidden state taken from the
        generation's own prefill (handed to the scorer through the call's
        :class:`~ssd_guard.scoring.callstats.CallStats`)."""
        session = _Session()
        session.stats.hidden_provider = lambda texts: self._hidden_for(texts, session)

        def generate(p: str, temperature: float | None = None) -> str:
            # Regenerations after reject_answer come with the guard's sampling temperature.
            return self._generate(p, session, temperature)

        try:
            return self.guard.run(prompt, generate, **kw, stats=session.stats)
        finally:
            session.kv.clear()  # free the KV caches of prefills nobody decoded from

    async def ainvoke(self, prompt: str, **kw: Unpack[InvokeKwargs]) -> GuardResult:
        """:meth:`invoke` on a worker thread (the model work is synchronous)."""
        return await asyncio.to_thread(lambda: self.invoke(prompt, **kw))

    def as_chat_model(self, *, tags: Sequence[str] = ()) -> Any:
        """Deprecated: use ``LocalGuardedChatModel(local)`` from
        :mod:`ssd_guard.integrations.langchain` (the integration builds on this class; this
        core module does not import it). Kept working for one release."""
        warnings.warn(
            "GuardedLocalModel.as_chat_model() is deprecated; use "
            "ssd_guard.integrations.langchain.LocalGuardedChatModel(local) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        import importlib

        integration = importlib.import_module("ssd_guard.integrations.langchain")
        return integration.LocalGuardedChatModel(self, tags=tags)

    def __repr__(self) -> str:
        return (
            f"GuardedLocalModel(model={self.model_id!r}, layer={self.scorer.layer}, "
            f"max_new_tokens={self.max_new_tokens}, policy={self.guard.policy.name!r})"
        )
