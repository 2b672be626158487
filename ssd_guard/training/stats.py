"""Shared inputs of the scorers, computed once per prompt batch (a stat-calculator layer).

In the spirit of lm-polygraph's estimator / stat-calculator split: every scorer declares
the statistics it ``needs`` (``"hidden"``, ``"default"``, ``"samples"``,
``"default_embeddings"``, ``"sample_embeddings"``); a calculator fills one :class:`Stats`
for the union of the needs of all scorers, and every scorer reads from it. Stats come
from the distillation work directory (evaluation, see ``ssd_guard.training.workdir_data``)
or live from a base model and an embedder (:class:`LiveStats`: the guard, cost timing).

Lower layers only: nothing here imports the guard, the policy or the evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "NEEDS",
    "LiveStats",
    "Scorer",
    "Stats",
    "StatsCalculator",
    "compute_stats",
    "embed_texts",
]

#: Every statistic a scorer may declare in ``needs``.
NEEDS = frozenset({"hidden", "default", "samples", "default_embeddings", "sample_embeddings"})


@dataclass
class Stats:
    """The shared inputs for ``N`` prompts.

    Attributes:
        prompts: the texts the base model sees (few-shot prefix included).
        ids: optional row identifiers.
        hidden: last-prompt-token hidden states ``[N, L+1, H]`` at every layer
            (index 0 = embeddings), any dtype.
        hidden_layers: hidden states of single layers ``{layer: [N, H]}`` when only
            some were computed (a truncated prefill).
        pooled: question-mean-pooled hidden states ``[N, L+1, H]`` (for students that
            read them; see :class:`~ssd_guard.features.FeatureSpec`).
        default: the low-temperature default answer per prompt.
        samples: ``K`` stochastic answers per prompt.
        default_embeddings: ``[N, E]`` L2-normalised sentence embeddings of ``default``.
        sample_embeddings: ``[N, K, E]`` L2-normalised embeddings of ``samples``.
        cache: derived statistics shared between scorers (e.g. semantic clusters),
            keyed by whoever computes them.
        seconds: wall time spent computing each statistic (live calculators).
    """

    prompts: list[str]
    ids: list[str] | None = None
    hidden: torch.Tensor | None = None
    hidden_layers: dict[int, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    default: list[str] | None = None
    samples: list[list[str]] | None = None
    default_embeddings: np.ndarray | None = None
    sample_embeddings: np.ndarray | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def has(self, need: str) -> bool:
        if need == "hidden":
            return self.hidden is not None or bool(self.hidden_layers)
        return getattr(self, need) is not None

    def require(self, needs: Iterable[str], who: str = "scorer") -> None:
        missing = sorted(n for n in needs if not self.has(n))
        if missing:
            raise ValueError(f"{who} needs statistics that were not computed: {missing}")

    @property
    def num_layers(self) -> int | None:
        """``L`` (the index of the last layer), when the full hidden stack is present."""
        return None if self.hidden is None else int(self.hidden.shape[1]) - 1

    def layer(self, layer: int) -> np.ndarray:
        """Hidden states of one layer as float32 ``[N, H]``."""
        if layer in self.hidden_layers:
            h = self.hidden_layers[layer]
        elif self.hidden is not None:
            idx = layer if layer >= 0 else self.hidden.shape[1] + layer
            if not 0 <= idx < self.hidden.shape[1]:
                raise IndexError(f"layer {layer} out of range 0..{self.hidden.shape[1] - 1}")
            h = self.hidden[:, idx]
        else:
            raise ValueError("no hidden states in these stats")
        return h.detach().to("cpu", torch.float32).numpy()

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Compute a derived statistic once and share it (e.g. SE clusters for SE and SEP)."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def subset(self, index: Sequence[int] | np.ndarray) -> Stats:
        """The stats of some prompts, in the given order (the derived cache is dropped)."""
        idx = np.asarray(index, dtype=np.intp)
        t_idx = torch.as_tensor(idx, dtype=torch.long)

        def pick(seq: list[Any] | None) -> list[Any] | None:
            return None if seq is None else [seq[i] for i in idx]

        return Stats(
            prompts=[self.prompts[i] for i in idx],
            ids=pick(self.ids),
            hidden=None if self.hidden is None else self.hidden[t_idx],
            hidden_layers={k: v[t_idx] for k, v in self.hidden_layers.items()},
            pooled=None if self.pooled is None else self.pooled[t_idx],
            default=pick(self.default),
            samples=pick(self.samples),
            default_embeddings=None
            if self.default_embeddings is None
            else self.default_embeddings[idx],
            sample_embeddings=None
            if self.sample_embeddings is None
            else self.sample_embeddings[idx],
        )

    def with_answers(self, answers: list[str], embeddings: np.ndarray | None = None) -> Stats:
        """A copy whose default answers are replaced (e.g. answers the caller generated)."""
        return replace(self, default=list(answers), default_embeddings=embeddings, cache={})


@runtime_checkable
class StatsCalculator(Protocol):
    """Computes the statistics ``needs`` for a batch of prompts, each one once."""

    def __call__(
        self, prompts: Sequence[str], needs: Iterable[str], layers: Iterable[int] | None = None
    ) -> Stats: ...


class Scorer:
    """Base class of the stats-based scorers (TD, SE, SEP, PCP; SSD via an adapter).

    Subclasses set ``name`` and ``needs`` and implement :meth:`score`. Like scikit-learn,
    ``__init__`` stores parameters, :meth:`fit` returns ``self`` and learned state ends
    in ``_``. ``score_prompts`` (the :class:`~ssd_guard.scoring.base.PromptScorer`
    interface the guard uses) computes the stats with the bound ``calculator``.
    """

    name: str = "scorer"
    needs: frozenset[str] = frozenset()
    #: Extra statistics :meth:`score_answers` reads beyond ``needs``.
    answer_needs: frozenset[str] = frozenset()
    calculator: StatsCalculator | None = None

    @property
    def layers(self) -> set[int] | None:
        """Hidden layers read (``None`` = none or unknown); lets a prefill stop early."""
        return None

    def bind(self, calculator: StatsCalculator) -> Scorer:
        """Attach the stats calculator used by :meth:`score_prompts`; returns ``self``."""
        self.calculator = calculator
        return self

    def fit(self, stats: Stats, y: np.ndarray | None = None, **kwargs: Any) -> Scorer:
        return self

    def score(self, stats: Stats) -> np.ndarray:
        """One risk score per prompt (higher = riskier), float64 ``[N]``."""
        raise NotImplementedError

    def score_answers(self, stats: Stats) -> np.ndarray | None:
        """Risk of each prompt's default answer (post-generation), or ``None`` if the
        method has no answer-level score."""
        return None

    def score_prompts(self, prompts: Sequence[str]) -> list[float]:
        if self.calculator is None:
            raise RuntimeError(
                f"{type(self).__name__}.score_prompts needs a stats calculator: "
                "call .bind(LiveStats(lm, embedder)) first"
            )
        stats = self.calculator(list(prompts), self.needs, self.layers)
        return [float(v) for v in self.score(stats)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def compute_stats(
    calculator: StatsCalculator,
    prompts: Sequence[str],
    scorers: Iterable[Scorer],
    *,
    answers: bool = False,
) -> Stats:
    """One stats pass for several scorers: the union of their needs and layers."""
    needs: set[str] = set()
    layers: set[int] | None = set()
    for sc in scorers:
        needs |= sc.needs | (sc.answer_needs if answers else frozenset())
        if "hidden" in sc.needs:
            ly = sc.layers
            layers = None if ly is None or layers is None else layers | ly
    return calculator(list(prompts), needs, layers if "hidden" in needs else None)


# --------------------------------------------------------------------------- live
def embed_texts(embedder: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 sentence embeddings ``[n, E]`` (sentence-transformers API)."""
    if not texts:
        dim = getattr(embedder, "get_sentence_embedding_dimension", lambda: 0)() or 0
        return np.zeros((0, dim), dtype=np.float32)
    from ssd_guard.embedding import encode_normalised

    return encode_normalised(embedder, texts, batch_size).cpu().numpy()


class _StopForward(Exception):
    pass


def _decoder_layers(model: Any) -> Any | None:
    from ssd_guard.encoding import decoder_layers

    try:
        return decoder_layers(model)
    except ValueError:  # unknown architecture: run full forwards instead
        return None


class LiveStats:
    """Compute stats from a base model (and an embedder) at call time.

    Args:
        lm: a :class:`~ssd_guard.models.LoadedModel` (or anything with ``model`` and a
            left-padding ``tokenizer``).
        embedder: a sentence-transformers model; needed for the ``*_embeddings`` stats.
        n_samples, temperature, default_temperature, max_new_tokens: teacher sampling,
            as in the distillation recipe.
        batch_size: prompts per forward pass.
        seed: sampling seed; each call reseeds, so the same prompts give the same stats.

    When only ``hidden`` of some layers is needed, the prefill stops after the deepest
    of them (a forward hook raises once that layer has run).
    """

    def __init__(
        self,
        lm: Any,
        embedder: Any | None = None,
        *,
        n_samples: int = 10,
        temperature: float = 1.0,
        default_temperature: float = 0.0,
        max_new_tokens: int = 16,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.lm, self.embedder = lm, embedder
        self.n_samples, self.temperature = n_samples, temperature  # as the teacher's
        self.default_temperature, self.max_new_tokens = default_temperature, max_new_tokens
        self.batch_size, self.seed = batch_size, seed
        self._stop_table: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        device: torch.device = next(self.lm.model.parameters()).device
        return device

    def __call__(
        self, prompts: Sequence[str], needs: Iterable[str], layers: Iterable[int] | None = None
    ) -> Stats:
        needs = set(needs)
        unknown = needs - NEEDS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(NEEDS)}")
        if "sample_embeddings" in needs:
            needs.add("samples")
        if "default_embeddings" in needs:
            needs.add("default")
        stats = Stats(prompts=list(prompts))
        if not prompts:
            return stats
        if needs & {"samples", "default"}:
            self._generate(stats, with_hidden="hidden" in needs)
        elif "hidden" in needs:
            self._prefill(stats, None if layers is None else sorted(set(layers)))
        if needs & {"default_embeddings", "sample_embeddings"}:
            if self.embedder is None:
                raise ValueError("embedding statistics need an embedder: LiveStats(lm, embedder)")
            t0 = time.perf_counter()
            assert stats.default is not None
            flat = list(stats.default)
            if stats.samples is not None and "sample_embeddings" in needs:
                flat += [s for row in stats.samples for s in row]
            emb = embed_texts(self.embedder, flat)
            n = len(stats.prompts)
            stats.default_embeddings = emb[:n]
            if stats.samples is not None and "sample_embeddings" in needs:
                k = len(stats.samples[0]) if stats.samples else 0
                stats.sample_embeddings = emb[n:].reshape(n, k, -1)
            stats.seconds["embed"] = time.perf_counter() - t0
        return stats

    def _generate(self, stats: Stats, with_hidden: bool) -> None:
        from ssd_guard.generation import sample_answers, sampling_of, stop_token_table

        t0 = time.perf_counter()
        if self._stop_table is None:
            self._stop_table = stop_token_table(self.lm.tokenizer, self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        default: list[str] = []
        samples: list[list[str]] = []
        hidden: list[torch.Tensor] = []
        for b in range(0, len(stats.prompts), self.batch_size):
            res = sample_answers(
                self.lm.model,
                self.lm.tokenizer,
                stats.prompts[b : b + self.batch_size],
                **sampling_of(self),
                generator=gen,
                return_hidden=with_hidden,
                stop_table=self._stop_table,
            )
            default += res.default
            samples += res.samples
            if with_hidden and res.hidden is not None:
                hidden.append(res.hidden.cpu())
        stats.default, stats.samples = default, samples
        if hidden:
            stats.hidden = torch.cat(hidden)
        stats.seconds["generate"] = time.perf_counter() - t0

    @torch.inference_mode()
    def _prefill(self, stats: Stats, layers: list[int] | None) -> None:
        from ssd_guard.generation import left_pad_positions

        t0 = time.perf_counter()
        model, tok = self.lm.model, self.lm.tokenizer
        blocks = _decoder_layers(model)
        truncate = layers is not None and blocks is not None and len(layers) > 0
        captured: dict[int, list[torch.Tensor]] = {}
        full: list[torch.Tensor] = []
        for b in range(0, len(stats.prompts), self.batch_size):
            enc = tok(
                stats.prompts[b : b + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=True,
            )
            ids = enc["input_ids"].to(self.device)
            attn = enc["attention_mask"].to(self.device)
            kwargs = {
                "input_ids": ids,
                "attention_mask": attn,
                "position_ids": left_pad_positions(attn),
                "use_cache": False,
            }
            if not truncate:
                out = model(**kwargs, output_hidden_states=True)
                full.append(torch.stack([h[:, -1, :] for h in out.hidden_states], 1).cpu())
                continue
            assert layers is not None and blocks is not None
            last = max(layers)
            got: dict[int, torch.Tensor] = {}
            handles = []

            def hook_for(
                idx: int, stop: bool, got: dict[int, torch.Tensor] = got
            ) -> Callable[..., None]:
                def hook(_mod: Any, _inp: Any, output: Any) -> None:
                    h = output[0] if isinstance(output, tuple) else output
                    got[idx] = h[:, -1, :].detach().cpu()
                    if stop:
                        raise _StopForward

                return hook

            emb = model.get_input_embeddings()
            if 0 in layers:
                handles.append(emb.register_forward_hook(hook_for(0, last == 0)))
            for ly in layers:
                # The last layer comes normed from hidden_states[-1], not from its block.
                if 0 < ly < len(blocks):
                    handles.append(blocks[ly - 1].register_forward_hook(hook_for(ly, ly == last)))
            try:
                # The final layer's output is normed only in hidden_states[-1]; stop
                # early only when the deepest requested layer is not the last one.
                if last > len(blocks):
                    raise IndexError(f"layer {last} out of range 0..{len(blocks)}")
                if last == len(blocks):
                    out = model(**kwargs, output_hidden_states=True)
                    got[last] = out.hidden_states[-1][:, -1, :].cpu()
                else:
                    model(**kwargs)
            except _StopForward:
                pass
            finally:
                for hd in handles:
                    hd.remove()
            for ly in layers:
                captured.setdefault(ly, []).append(got[ly])
        if full:
            stats.hidden = torch.cat(full)
        else:
            stats.hidden_layers = {ly: torch.cat(v) for ly, v in captured.items()}
        stats.seconds["prefill"] = time.perf_counter() - t0
