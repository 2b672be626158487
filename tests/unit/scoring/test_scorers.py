"""TD, SE (embedding / string / function / NLI equivalence), SEP and PCP on synthetic stats."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_guard.evaluation.baselines.dispersion import TeacherDispersion, dispersion
from ssd_guard.training.probes import (
    KnowProbe,
    LinearProbe,
    SemanticEntropyProbe,
    best_split_threshold,
)
from ssd_guard.training.semantic_entropy import (
    EmbeddingEquivalence,
    NLIEquivalence,
    SemanticEntropy,
    StringEquivalence,
    cluster_entropy,
    greedy_clusters,
    make_equivalence,
)
from ssd_guard.training.stats import Scorer, Stats, compute_stats

K = 6


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _stats_same_and_distinct() -> Stats:
    """Prompt 0: K identical answers; prompt 1: K distinct (orthogonal) answers."""
    same = np.tile(np.eye(8, dtype=np.float32)[0], (K, 1))
    distinct = np.eye(8, dtype=np.float32)[:K]
    return Stats(
        prompts=["p0", "p1"],
        default=["Paris", "Rome"],
        samples=[["Paris"] * K, [f"answer {c}" for c in "abcdef"]],
        default_embeddings=np.stack([same[0], distinct[0]]),
        sample_embeddings=np.stack([same, distinct]),
    )


# --------------------------------------------------------------------------- SE
def test_cluster_entropy_hand_computed() -> None:
    assert cluster_entropy([0] * K) == 0.0
    assert cluster_entropy(list(range(K))) == pytest.approx(math.log(K))
    assert cluster_entropy([0, 0, 1, 1]) == pytest.approx(math.log(2))
    assert cluster_entropy([]) == 0.0


@pytest.mark.parametrize("equivalence", ["embedding", "string"])
def test_se_identical_is_zero_and_distinct_is_log_k(equivalence: str) -> None:
    se = SemanticEntropy(equivalence, threshold=0.9)
    scores = se.score(_stats_same_and_distinct())
    assert scores[0] == pytest.approx(0.0)
    assert scores[1] == pytest.approx(math.log(K))
    np.testing.assert_array_equal(se.n_classes(_stats_same_and_distinct()), [1, K])


def test_string_equivalence_normalises() -> None:
    labels = StringEquivalence().cluster(["The Beatles", "beatles!", "  the  BEATLES ", "Stones"])
    assert labels.tolist() == [0, 0, 0, 1]


def test_embedding_equivalence_threshold_and_greedy_representatives() -> None:
    a = np.array([1.0, 0.0])
    b = np.array([math.cos(0.5), math.sin(0.5)])  # cos(a, b) = 0.878
    c = np.array([math.cos(1.0), math.sin(1.0)])  # cos(a, c) = 0.540, cos(b, c) = 0.878
    emb = np.stack([a, b, c])
    assert EmbeddingEquivalence(0.8).cluster(["a", "b", "c"], emb).tolist() == [0, 0, 1]
    assert EmbeddingEquivalence(0.95).cluster(["a", "b", "c"], emb).tolist() == [0, 1, 2]
    assert EmbeddingEquivalence(0.5).cluster(["a", "b", "c"], emb).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        EmbeddingEquivalence(1.5)


def test_function_equivalence_is_pluggable() -> None:
    def first_letter(x: str, y: str) -> bool:
        return x[:1].lower() == y[:1].lower()

    se = SemanticEntropy(first_letter)
    assert se.needs == frozenset({"samples"})
    st = Stats(prompts=["p"], samples=[["apple", "Avocado", "banana", "blueberry"]])
    assert se.score(st)[0] == pytest.approx(math.log(2))
    assert greedy_clusters(3, lambda r, i: False).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown equivalence"):
        make_equivalence("bogus")
    with pytest.raises(ValueError, match="nli_model"):
        make_equivalence("nli")


def test_se_answer_level_and_cache() -> None:
    st = _stats_same_and_distinct()
    se = SemanticEntropy("string")
    ans = se.score_answers(st)
    # Prompt 0: the default joins the K identical samples -> share 1 -> 0.
    assert ans[0] == pytest.approx(0.0)
    # Prompt 1: the default "Rome" matches none -> share 1/(K+1).
    assert ans[1] == pytest.approx(math.log(K + 1))
    se.score(st)
    assert any(k.startswith("se-clusters:string") for k in st.cache)


def test_scorer_requires_its_stats() -> None:
    with pytest.raises(ValueError, match="sample_embeddings"):
        SemanticEntropy("embedding").score(Stats(prompts=["p"], samples=[["a"]]))
    with pytest.raises(RuntimeError, match="calculator"):
        TeacherDispersion().score_prompts(["p"])


# --------------------------------------------------------------------------- NLI
def _tiny_nli(path: Path, favour: str | None, seed: int = 0) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    words += ["paris", "rome", "london", "the", "city", "answer"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    id2label = {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=3,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).eval()
    if favour is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(
                torch.tensor([10.0 if v.lower() == favour else 0.0 for v in id2label.values()])
            )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nli_equivalence_code_path(tmp_path: Path) -> None:
    samples = [["paris", "the city paris", "rome", "london"], ["rome", "rome", "paris", "x"]]
    st = Stats(prompts=["p0", "p1"], samples=samples)
    # Always "entailment": every pair equivalent -> one class -> SE 0.
    se = SemanticEntropy("nli", nli_model=_tiny_nli(tmp_path / "ent", "entailment"))
    assert se.needs == frozenset({"samples"})
    np.testing.assert_allclose(se.score(st), [0.0, 0.0])
    # Always "contradiction": only identical strings share a class.
    se = SemanticEntropy("nli", nli_model=_tiny_nli(tmp_path / "con", "contradiction"))
    np.testing.assert_allclose(se.score(st), [math.log(4), cluster_entropy([0, 0, 1, 2])])
    # Always "neutral": strict -> distinct; lenient (no contradiction, not both neutral) too.
    neutral = _tiny_nli(tmp_path / "neu", "neutral")
    for strict in (True, False):
        eq = NLIEquivalence(neutral, strict=strict, batch_size=3)
        assert eq.cluster(["paris", "rome"]).tolist() == [0, 1]
    # A randomly initialised classifier: runs, deterministic, within [0, log K].
    rand = _tiny_nli(tmp_path / "rand", None)
    a = SemanticEntropy("nli", nli_model=rand).score(st)
    b = SemanticEntropy("nli", nli_model=rand).score(st)
    np.testing.assert_allclose(a, b)
    assert np.all((a >= 0) & (a <= math.log(4) + 1e-9))


def test_nli_model_must_be_a_local_directory(tmp_path: Path) -> None:
    from ssd_guard.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="local directory"):
        NLIEquivalence(tmp_path / "missing").cluster(["a", "b"])


# --------------------------------------------------------------------------- TD
def test_dispersion_hand_computed() -> None:
    x = np.array([[[0.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # Prompt 0: per-dim std (ddof=1) = [sqrt(2), 0] -> mean sqrt(2)/2; var sum = 2.
    np.testing.assert_allclose(dispersion(x, "std", ddof=1), [math.sqrt(2) / 2, 0.0])
    np.testing.assert_allclose(dispersion(x, "trace", ddof=1), [2.0, 0.0])
    np.testing.assert_allclose(dispersion(x, "trace", ddof=0), [1.0, 0.0])
    with pytest.raises(ValueError):
        dispersion(x[0], "std")


def test_td_scorer_matches_the_distillation_definition() -> None:
    from ssd_guard.training.distill.stages_late import teacher_dispersion

    emb = _unit(np.random.default_rng(0), 5, K, 12)
    ours = TeacherDispersion("std").score(Stats(prompts=["p"] * 5, sample_embeddings=emb))
    np.testing.assert_allclose(ours, teacher_dispersion(torch.from_numpy(emb)).numpy(), rtol=1e-5)
    st = _stats_same_and_distinct()
    td = TeacherDispersion("trace")
    s = td.score(st)
    assert s[0] == pytest.approx(0.0) and s[1] > 0
    ans = td.score_answers(st)
    assert ans[0] == pytest.approx(0.0, abs=1e-9) and ans[1] > 0
    # Projection: the identity PCA leaves the trace unchanged.
    proj = (np.zeros(8), np.eye(8), np.ones(8))
    np.testing.assert_allclose(TeacherDispersion("trace", projection=proj).score(st), s)


# --------------------------------------------------------------------------- probes
def _probe_stats(n: int, seed: int) -> tuple[Stats, np.ndarray, np.ndarray]:
    """Hidden [n, 4, 10]: layer 2 carries the signal; samples agree iff 'known'."""
    rng = np.random.default_rng(seed)
    known = rng.random(n) < 0.5
    hidden = rng.normal(size=(n, 4, 10)).astype(np.float32)
    hidden[:, 2, 0] += np.where(known, 2.0, -2.0)
    samples = [["same"] * K if k else [f"w{i}-{j}" for j in range(K)] for i, k in enumerate(known)]
    st = Stats(
        prompts=[f"p{i}" for i in range(n)], hidden=torch.from_numpy(hidden), samples=samples
    )
    se = np.array([0.0 if k else math.log(K) for k in known])
    return st, known, se


def test_best_split_threshold() -> None:
    assert best_split_threshold(np.array([0.0, 0.1, 0.2, 2.0, 2.1])) == pytest.approx(1.1)
    assert best_split_threshold(np.array([1.0, 1.0])) == 1.0
    with pytest.raises(ValueError):
        best_split_threshold(np.array([]))


def test_pcp_fit_selects_layer_scores_and_roundtrips(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    train, known, _ = _probe_stats(160, 0)
    val, known_v, _ = _probe_stats(60, 1)
    test, known_t, _ = _probe_stats(60, 2)
    pcp = KnowProbe(seed=0).fit(train, known, validation=(val, known_v))
    assert pcp is not None and pcp.layer_ == 2
    assert set(pcp.layer_scores_) == {1, 2, 3}
    risk = pcp.score(test)
    assert roc_auc_score(~known_t, risk) > 0.95
    np.testing.assert_allclose(pcp.p_know(test), 1 - risk)
    pcp.save(tmp_path / "pcp")
    assert sorted(p.name for p in (tmp_path / "pcp").iterdir()) == [
        "probe.json",
        "probe.safetensors",
    ]
    loaded = LinearProbe.load(tmp_path / "pcp")
    assert isinstance(loaded, KnowProbe) and loaded.layer_ == 2
    np.testing.assert_allclose(loaded.score(test), risk, rtol=1e-6)
    assert loaded.layers == {2}
    with pytest.raises(ValueError, match="PCP"):
        SemanticEntropyProbe.load(tmp_path / "pcp")


def test_sep_targets_binarised_se_and_cv_without_validation(tmp_path: Path) -> None:
    train, known, se = _probe_stats(150, 3)
    test, known_t, _ = _probe_stats(50, 4)
    sep = SemanticEntropyProbe(entropy=SemanticEntropy("string"), seed=0).fit(train)
    assert sep.layer_ == 2
    assert 0 < sep.threshold_ < math.log(K)
    assert sep.train_rate_ == pytest.approx(float((~known).mean()))
    s1 = sep.score(test)
    assert np.mean((s1 > 0.5) == ~known_t) > 0.9
    # Given SE values and a fixed layer, it is deterministic and needs no samples.
    sep2 = SemanticEntropyProbe(2, seed=0).fit(
        Stats(prompts=train.prompts, hidden=train.hidden), se
    )
    sep3 = SemanticEntropyProbe(2, seed=0).fit(
        Stats(prompts=train.prompts, hidden=train.hidden), se
    )
    np.testing.assert_allclose(sep2.coef_, sep3.coef_)
    sep2.save(tmp_path / "sep")
    loaded = SemanticEntropyProbe.load(tmp_path / "sep")
    assert loaded.threshold_ == pytest.approx(sep2.threshold_)
    np.testing.assert_allclose(loaded.score(test), sep2.score(test), rtol=1e-6)
    with pytest.raises(ValueError, match="SE values"):
        SemanticEntropyProbe(2).fit(train)
    with pytest.raises(RuntimeError, match="not fitted"):
        KnowProbe().score(test)


def test_single_class_target_gives_a_constant_probe() -> None:
    train, _, _ = _probe_stats(40, 5)
    pcp = KnowProbe(1).fit(train, np.ones(40, dtype=bool))
    s = pcp.score(train)
    assert np.allclose(s, s[0]) and s[0] < 0.01


# --------------------------------------------------------------------------- stats
def test_stats_subset_layer_and_compute_stats_union() -> None:
    st, _, _ = _probe_stats(5, 6)
    st.default = [f"d{i}" for i in range(5)]
    sub = st.subset([3, 1])
    assert sub.prompts == ["p3", "p1"] and sub.default == ["d3", "d1"]
    np.testing.assert_allclose(sub.layer(2), st.layer(2)[[3, 1]])
    assert sub.layer(-1).shape == (2, 10) and st.num_layers == 3
    with pytest.raises(IndexError):
        st.layer(9)

    seen: dict[str, object] = {}

    def calc(prompts, needs, layers=None):
        seen.update(needs=set(needs), layers=layers)
        return Stats(prompts=list(prompts))

    probe = KnowProbe(3)
    probe.layer_ = 3
    compute_stats(calc, ["a"], [probe, SemanticEntropy("embedding"), TeacherDispersion()])
    assert seen == {"needs": {"hidden", "samples", "sample_embeddings"}, "layers": {3}}
    compute_stats(calc, ["a"], [TeacherDispersion()], answers=True)
    assert seen["needs"] == {"sample_embeddings", "default_embeddings"}
    assert isinstance(TeacherDispersion(), Scorer)
