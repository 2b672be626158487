"""SE (semantic entropy): cluster the K sampled answers into meaning classes and take the
entropy of the class frequencies (the discrete estimator of Kuhn et al., 2023 and
Farquhar et al., 2024).

Whether two answers mean the same is a pluggable :class:`Equivalence`:

* :class:`EmbeddingEquivalence` — cosine similarity of the sentence embeddings at or
  above a threshold (the default: no NLI model ships in a registry package);
* :class:`StringEquivalence` — equal after SQuAD normalisation (case, punctuation,
  articles, spaces);
* :class:`NLIEquivalence` — bidirectional entailment under a local Hugging Face
  sequence-classification NLI model (give its directory);
* any ``f(a: str, b: str) -> bool`` (wrapped in :class:`FunctionEquivalence`).

Clustering is greedy, as in Kuhn et al.: each answer joins the first class whose first
member it is equivalent to, else it opens a new class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ssd_guard.training.distill.data import normalize_answer
from ssd_guard.training.stats import Scorer, Stats

__all__ = [
    "EmbeddingEquivalence",
    "Equivalence",
    "FunctionEquivalence",
    "NLIEquivalence",
    "SemanticEntropy",
    "StringEquivalence",
    "cluster_entropy",
    "greedy_clusters",
    "make_equivalence",
]


def cluster_entropy(labels: Sequence[int] | np.ndarray) -> float:
    """Entropy (nats) of the class frequencies of ``labels``: 0 for one class, log K
    for K singletons."""
    lab = np.asarray(labels)
    if lab.size == 0:
        return 0.0
    _, counts = np.unique(lab, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def greedy_clusters(n: int, equivalent: Callable[[int, int], bool]) -> np.ndarray:
    """Greedy meaning classes of ``n`` items: item ``i`` joins the first class whose
    representative (its first member) ``r`` satisfies ``equivalent(r, i)``."""
    labels = np.full(n, -1, dtype=np.int64)
    reps: list[int] = []
    for i in range(n):
        for c, r in enumerate(reps):
            if equivalent(r, i):
                labels[i] = c
                break
        else:
            labels[i] = len(reps)
            reps.append(i)
    return labels


@runtime_checkable
class Equivalence(Protocol):
    """Decides which answers share a meaning."""

    #: A short identifier (used to cache clusters and in reports).
    key: str
    #: Whether :meth:`cluster_many` reads the answers' embeddings.
    uses_embeddings: bool

    def cluster_many(
        self, texts: Sequence[Sequence[str]], embeddings: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        """Class labels for each group of answers (one group per prompt)."""
        ...


class _Pairwise:
    """Greedy clustering from a per-group pairwise ``[n, n]`` equivalence matrix."""

    key = "pairwise"
    uses_embeddings = False

    def matrix(self, texts: Sequence[str], embeddings: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def cluster(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        m = self.matrix(texts, embeddings)
        return greedy_clusters(len(texts), lambda r, i: bool(m[r, i]))

    def cluster_many(
        self, texts: Sequence[Sequence[str]], embeddings: Sequence[np.ndarray] | None
    ) -> list[np.ndarray]:
        embs = embeddings if embeddings is not None else [None] * len(texts)
        return [self.cluster(t, e) for t, e in zip(texts, embs, strict=True)]


class EmbeddingEquivalence(_Pairwise):
    """Same meaning when the cosine similarity of the embeddings is ``>= threshold``."""

    uses_embeddings = True

    def __init__(self, threshold: float = 0.8) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
        self.threshold = threshold
        self.key = f"cosine>={threshold:g}"

    def matrix(self, texts: Sequence[str], embeddings: np.ndarray | None) -> np.ndarray:
        if embeddings is None:
            raise ValueError("embedding equivalence needs the answers' embeddings")
        e = np.asarray(embeddings, dtype=np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        sim = e @ e.T
        return np.asarray((sim >= self.threshold - 1e-9) | np.eye(len(e), dtype=bool))


class StringEquivalence(_Pairwise):
    """Same meaning when equal after :func:`~ssd_guard.training.distill.data.normalize_answer`."""

    key = "string"

    def matrix(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        norm = [normalize_answer(t) for t in texts]
        return np.array([[a == b for b in norm] for a in norm], dtype=bool)


class FunctionEquivalence(_Pairwise):
    """Wraps a user function ``f(a, b) -> bool`` (called lazily, representatives first)."""

    def __init__(self, fn: Callable[[str, str], bool], key: str | None = None) -> None:
        self.fn = fn
        self.key = key or f"fn:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def cluster(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        return greedy_clusters(len(texts), lambda r, i: bool(self.fn(texts[r], texts[i])))


class NLIEquivalence(_Pairwise):
    """Bidirectional entailment under a local NLI sequence-classification model.

    Args:
        model: a local directory holding a Hugging Face ``AutoModelForSequenceClassification``
            NLI model and its tokenizer (``config.id2label`` must name an entailment
            class, e.g. ``entailment`` / ``ENTAILMENT``), or an already loaded
            ``(model, tokenizer)`` pair.
        strict: ``True`` (Kuhn et al.): equivalent iff each answer entails the other.
            ``False`` (Farquhar et al.): neither direction is a contradiction and not
            both are neutral.
        prefix: text put before both answers (e.g. the question), as some setups do.
        batch_size, max_length, device: inference settings.

    All ordered pairs of distinct answers of all prompts go through the model in
    batches; identical strings are equivalent without a call.
    """

    def __init__(
        self,
        model: str | Path | tuple[Any, Any],
        *,
        strict: bool = True,
        prefix: str = "",
        batch_size: int = 64,
        max_length: int = 128,
        device: str | None = None,
    ) -> None:
        self.model_ref, self.strict, self.prefix = model, strict, prefix
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self._model: Any = None
        self._tokenizer: Any = None
        name = Path(model).name if isinstance(model, str | Path) else "custom"
        self.key = f"nli:{name}:{'strict' if strict else 'lenient'}"

    # ----------------------------------------------------------------- model
    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            if isinstance(self.model_ref, tuple):
                self._model, self._tokenizer = self.model_ref
            else:
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                path = Path(self.model_ref).expanduser()
                if not path.is_dir():
                    from ssd_guard.errors import ModelLoadError

                    raise ModelLoadError(
                        f"NLI model {str(path)!r} is not a local directory; give the path of "
                        "a Hugging Face sequence-classification NLI model"
                    )
                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self._model = AutoModelForSequenceClassification.from_pretrained(
                    path, local_files_only=True
                )
            if self.device is not None:
                self._model.to(self.device)
            self._model.eval()
            labels = {int(i): str(v).lower() for i, v in self._model.config.id2label.items()}
            self.entail_ = _label_index(labels, "entail")
            self.contra_ = _label_index(labels, "contradict")
            self.neutral_ = _label_index(labels, "neutral")
            if self.entail_ is None:
                raise ValueError(f"the NLI model's id2label {labels} names no entailment class")
        return self._model, self._tokenizer

    def predict(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Predicted NLI class index of each ``(premise, hypothesis)`` pair."""
        import torch

        model, tok = self._load()
        out: list[np.ndarray] = []
        device = next(model.parameters()).device
        with torch.inference_mode():
            for b in range(0, len(pairs), self.batch_size):
                chunk = pairs[b : b + self.batch_size]
                enc = tok(
                    [self.prefix + p for p, _ in chunk],
                    [self.prefix + h for _, h in chunk],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(device)
                logits = model(**enc).logits
                out.append(logits.argmax(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _equivalent(self, ab: int, ba: int) -> bool:
        if self.strict:
            return ab == self.entail_ and ba == self.entail_
        if ab == self.contra_ or ba == self.contra_:
            return False
        return not (ab == self.neutral_ and ba == self.neutral_)

    def cluster_many(
        self, texts: Sequence[Sequence[str]], embeddings: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        self._load()
        uniques = [list(dict.fromkeys(t)) for t in texts]
        pairs: list[tuple[str, str]] = []
        for u in uniques:
            pairs += [(a, b) for a in u for b in u if a != b]
        pred = iter(self.predict(pairs).tolist())
        result: list[np.ndarray] = []
        for t, u in zip(texts, uniques, strict=True):
            m = len(u)
            cls = np.full((m, m), -1, dtype=np.int64)
            for i in range(m):
                for j in range(m):
                    if i != j:
                        cls[i, j] = next(pred)
            pos = {s: i for i, s in enumerate(u)}
            ui = [pos[s] for s in t]

            def eq(r: int, i: int, ui: list[int] = ui, cls: np.ndarray = cls) -> bool:
                a, b = ui[r], ui[i]
                return a == b or self._equivalent(int(cls[a, b]), int(cls[b, a]))

            result.append(greedy_clusters(len(t), eq))
        return result

    def matrix(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError("NLIEquivalence clusters through cluster_many")

    def cluster(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        return self.cluster_many([texts])[0]


def _label_index(labels: dict[int, str], stem: str) -> int | None:
    for i, name in labels.items():
        if stem in name:
            return i
    return None


def make_equivalence(
    equivalence: str | Equivalence | Callable[[str, str], bool] = "embedding",
    *,
    threshold: float = 0.8,
    nli_model: str | Path | None = None,
    strict: bool = True,
) -> Equivalence:
    """Build an equivalence from a name (``embedding`` / ``string`` / ``nli``), an
    :class:`Equivalence` instance, or a pairwise function."""
    if isinstance(equivalence, str):
        if equivalence in ("embedding", "cosine"):
            return EmbeddingEquivalence(threshold)
        if equivalence in ("string", "exact"):
            return StringEquivalence()
        if equivalence == "nli":
            if nli_model is None:
                raise ValueError("equivalence 'nli' needs nli_model=<local model directory>")
            return NLIEquivalence(nli_model, strict=strict)
        raise ValueError(f"unknown equivalence {equivalence!r}; use 'embedding', 'string' or 'nli'")
    if isinstance(equivalence, Equivalence):
        return equivalence
    if callable(equivalence):
        return FunctionEquivalence(equivalence)
    raise TypeError(f"not an equivalence: {equivalence!r}")


class SemanticEntropy(Scorer):
    """Semantic entropy of the K sampled answers (nats; higher = riskier).

    Args:
        equivalence: ``"embedding"`` (default), ``"string"``, ``"nli"``, an
            :class:`Equivalence`, or a function ``f(a, b) -> bool``.
        threshold: cosine threshold of the embedding equivalence.
        nli_model: local directory of an NLI model (with ``equivalence="nli"``).
        strict: bidirectional entailment (``True``) or the lenient variant.
        name: reported name; defaults to ``SE`` plus the equivalence.

    Answer-level score: ``-log`` of the share of the default answer's class when the
    default answer is clustered together with the samples (``-log((c+1)/(K+1))``).
    Clusters are cached in the :class:`Stats`, so SEP's targets reuse them.
    """

    def __init__(
        self,
        equivalence: str | Equivalence | Callable[[str, str], bool] = "embedding",
        *,
        threshold: float = 0.8,
        nli_model: str | Path | None = None,
        strict: bool = True,
        name: str | None = None,
        calculator: object | None = None,
    ) -> None:
        self.equivalence = make_equivalence(
            equivalence, threshold=threshold, nli_model=nli_model, strict=strict
        )
        self.name = name or f"SE ({self.equivalence.key})"
        emb = self.equivalence.uses_embeddings
        self.needs = frozenset({"samples", "sample_embeddings"} if emb else {"samples"})
        self.answer_needs = frozenset({"default", "default_embeddings"} if emb else {"default"})
        self.calculator = calculator  # type: ignore[assignment]

    def clusters(self, stats: Stats) -> list[np.ndarray]:
        """Class labels of each prompt's samples (cached in ``stats``)."""
        stats.require(self.needs, self.name)
        assert stats.samples is not None

        def compute() -> list[np.ndarray]:
            embs = (
                list(stats.sample_embeddings)
                if self.equivalence.uses_embeddings and stats.sample_embeddings is not None
                else None
            )
            return self.equivalence.cluster_many(stats.samples or [], embs)

        clusters: list[np.ndarray] = stats.cached(f"se-clusters:{self.equivalence.key}", compute)
        return clusters

    def score(self, stats: Stats) -> np.ndarray:
        return np.array([cluster_entropy(lab) for lab in self.clusters(stats)], dtype=np.float64)

    def n_classes(self, stats: Stats) -> np.ndarray:
        return np.array([len(np.unique(lab)) for lab in self.clusters(stats)], dtype=np.int64)

    def score_answers(self, stats: Stats) -> np.ndarray:
        stats.require(self.needs | self.answer_needs, self.name)
        assert stats.samples is not None and stats.default is not None

        def compute() -> list[np.ndarray]:
            texts = [[d, *s] for d, s in zip(stats.default or [], stats.samples or [], strict=True)]
            embs = None
            if self.equivalence.uses_embeddings:
                assert stats.default_embeddings is not None
                assert stats.sample_embeddings is not None
                embs = [
                    np.concatenate([d[None], s], axis=0)
                    for d, s in zip(stats.default_embeddings, stats.sample_embeddings, strict=True)
                ]
            return self.equivalence.cluster_many(texts, embs)

        labels = stats.cached(f"se-answer-clusters:{self.equivalence.key}", compute)
        # The default answer is item 0, so it represents class 0.
        return np.array(
            [-math.log(float((lab == lab[0]).sum()) / lab.size) for lab in labels],
            dtype=np.float64,
        )
