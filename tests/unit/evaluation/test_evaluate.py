"""`ssd-guard evaluate` end to end on tiny synthetic work directories, plus live stats.

The work directories are written file by file in the format ``ssd-guard distill``
produces (prompts, split, teacher shards, labels, embeddings, PCA, features, layers,
artifact), with answers and hidden states built so that the scorers have signal. The
base model is the tiny random Llama of ``conftest.py``; the embedder is a deterministic
character-trigram hasher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.workdirs import FEW_SHOT, LAYER, E, K, TrigramEmbedder, _jsonl, build_workdir  # noqa: F401

from ssd_guard.training.stats import LiveStats, Stats, compute_stats

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Any) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("workdirs")
    return build_workdir(base / "qa", tiny_lm), build_workdir(
        base / "arc", tiny_lm, mc=True, seed=1
    )


# --------------------------------------------------------------------------- end to end
def test_evaluate_end_to_end(workdirs: tuple[Path, Path], tiny_lm: Any, tmp_path: Path) -> None:
    from ssd_guard.evaluation.runner import run_evaluation

    qa, arc = workdirs
    from ssd_guard.scoring.semgrad import HybridGradScorer, SemGradScorer

    out = tmp_path / "report"
    logs: list[str] = []
    grads = [SemGradScorer(tiny_lm.model, tiny_lm.tokenizer)]
    grads.append(HybridGradScorer(tiny_lm.model, tiny_lm.tokenizer))
    res = run_evaluation(
        qa,
        out,
        arc_workdir=arc,
        cost_prompts=2,
        n_boot=40,
        lm=tiny_lm,
        embedder=TrigramEmbedder(),
        command="ssd-guard evaluate --workdir tiny",
        log=logs.append,
        pair_scorers=grads,
    )
    for name in ("report.md", "results.json", "roc.png", "risk_coverage.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "probes" / "sep" / "probe.safetensors").exists()
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["meta"]["command"] == "ssd-guard evaluate --workdir tiny"

    pre = res["hallucination"]["pre_generation"]
    post = res["hallucination"]["post_generation"]
    assert set(pre) == {"SSD", "TD-std", "TD-trace", "SE-cos", "SE-string", "SEP", "PCP"}
    assert set(post) == {
        "SSD-loglik",
        "SSD-pmi",
        "SSD-consensus",
        "SE-cos-answer",
        "TD-answer",
        "SemGrad",
        "HybridGrad",
    }
    # One gradient pass serves both pair scorers.
    assert res["pair_scorers"]["HybridGrad"]["shared_pass"] is True
    for block in (pre, post):
        for name, r in block.items():
            a = r["auroc"]
            assert 0.0 <= a["value"] <= 1.0, name
            assert a["low"] <= a["value"] <= a["high"], name
            assert 0.0 <= r["aurc"]["value"] <= 1.0
    # Built-in signal: samples agree iff the answer is right; the hidden state knows it.
    for name in ("TD-std", "TD-trace", "SE-cos", "SE-string", "PCP", "SEP"):
        assert pre[name]["auroc"]["value"] > 0.9, name
    assert res["meta"]["n_test"] == 12 and res["meta"]["ssd_layer"] == LAYER
    assert res["probes"]["PCP"]["layer"] == LAYER
    assert res["selective"]["aurc_oracle"] <= min(r["aurc"]["value"] for r in pre.values())
    assert set(res["fidelity"]["spearman_ssd_entropy_vs"]) >= {"TD-std", "TD-trace"}
    mm = res["mismatch"]
    assert 0.0 <= mm["auroc"]["value"] <= 1.0 and 0.0 <= mm["pairwise_accuracy"] <= 1.0

    mc = res["multiple_choice"]
    assert mc["n_test"] == 6 and mc["random_baseline"] == pytest.approx(0.25)
    for v in mc["accuracy"].values():
        assert 0.0 <= v["value"] <= 1.0

    cost = res["cost"]["per_prompt_ms"]
    assert set(cost) == {
        "SSD",
        "SSD-loglik",
        "SSD-answer-signals",
        "TD-std",
        "TD-trace",
        "SE-cos",
        "SE-string",
        "SEP",
        "PCP",
        "SemGrad",
        "HybridGrad",
    }
    assert cost["SSD"]["ratio_to_ssd"] == pytest.approx(1.0)
    assert all(v["mean"] > 0 for v in cost.values())

    report = (out / "report.md").read_text()
    for needle in (
        "ssd-guard evaluate --workdir tiny",
        "0.804",
        "0.89–0.99",
        "![ROC curves](roc.png)",
        "risk_coverage.png",
        "Multiple-choice selection",
        "Cost at inference",
        "Distillation fidelity",
    ):
        assert needle in report, needle
    assert any("AUROC" in m for m in logs)


def test_evaluate_cli(
    workdirs: tuple[Path, Path], tiny_lm: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The command line loads the artifact itself (base model by its recorded id)."""
    import ssd_guard.models as models
    from ssd_guard.cli import main

    monkeypatch.setattr(models, "shared_embedder", lambda *a, **k: TrigramEmbedder())
    monkeypatch.setattr(models, "shared_causal_lm", lambda *a, **k: tiny_lm)
    qa, _ = workdirs
    out = tmp_path / "cli"
    rc = main(
        [
            "evaluate",
            "--workdir",
            str(qa),
            "--out",
            str(out),
            "--n-boot",
            "20",
            "--cost-prompts",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert "multiple_choice" not in res and res["cost"]["n_prompts"] == 1
    assert res["meta"]["command"].startswith("ssd-guard ")
    assert main(["evaluate", "--out", str(out), "-q"]) == 1  # no work dir: a clean error


# --------------------------------------------------------------------------- live stats
def test_live_prefill_truncates_and_matches_full_hidden_states(tiny_lm: Any) -> None:
    prompts = ["Question: Who wrote Hamlet?\nAnswer:", "Question: What is 2+2?\nAnswer:"]
    live = LiveStats(tiny_lm, batch_size=2)
    full = live(prompts, {"hidden"})
    assert full.hidden is not None and full.hidden.shape[1] == tiny_lm.num_layers + 1
    part = live(prompts, {"hidden"}, layers=[0, LAYER])
    assert set(part.hidden_layers) == {0, LAYER} and part.hidden is None
    for ly in (0, LAYER):
        np.testing.assert_allclose(part.layer(ly), full.layer(ly), atol=1e-5)
    last = live(prompts, {"hidden"}, layers=[tiny_lm.num_layers])
    np.testing.assert_allclose(last.layer(tiny_lm.num_layers), full.layer(-1), atol=1e-5)


def test_live_generation_stats_are_shared_and_seeded(tiny_lm: Any) -> None:
    from ssd_guard.evaluation.baselines.dispersion import TeacherDispersion
    from ssd_guard.training.probes import KnowProbe
    from ssd_guard.training.semantic_entropy import SemanticEntropy

    prompts = ["Question: Who wrote Hamlet?\nAnswer:", "Question: What is 2+2?\nAnswer:"]
    live = LiveStats(tiny_lm, TrigramEmbedder(), n_samples=3, max_new_tokens=3, seed=5)
    se, td = SemanticEntropy("embedding"), TeacherDispersion()
    st = compute_stats(live, prompts, [se, td], answers=True)
    assert len(st.samples) == 2 and all(len(s) == 3 for s in st.samples)
    assert st.sample_embeddings.shape == (2, 3, E) and st.default_embeddings.shape == (2, E)
    again = live(prompts, {"samples"})
    assert again.samples == st.samples and again.default == st.default
    assert set(st.seconds) >= {"generate", "embed"}
    scores = se.bind(live).score_prompts(prompts)
    assert len(scores) == 2 and all(0.0 <= s <= math.log(3) + 1e-9 for s in scores)
    np.testing.assert_allclose(td.score(st), TeacherDispersion().bind(live).score_prompts(prompts))
    # A probe reads only its own layer through a truncated prefill.
    train = live([f"Question: item {i}?\nAnswer:" for i in range(8)], {"hidden"})
    pcp = KnowProbe(LAYER).fit(train, np.arange(8) % 2 == 0).bind(live)
    assert len(pcp.score_prompts(prompts)) == 2
    with pytest.raises(ValueError, match="embedder"):
        LiveStats(tiny_lm)(prompts, {"sample_embeddings"})
    with pytest.raises(ValueError, match="unknown"):
        live(prompts, {"logits"})
    assert len(live([], {"samples"})) == 0
    assert isinstance(st, Stats)


def test_load_workdir_falls_back_to_shards_and_live_embeddings(
    workdirs: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    from ssd_guard.errors import ConfigError
    from ssd_guard.training.metrics import derangement as _derangement
    from ssd_guard.training.workdir_data import load_workdir

    qa, _ = workdirs
    full = load_workdir(qa)
    copy = tmp_path / "wd"
    shutil.copytree(qa, copy)
    for name in ("features.safetensors", "embeddings.safetensors", "labels.jsonl"):
        (copy / name).unlink()
    part = load_workdir(copy, embedder=TrigramEmbedder())
    assert torch.equal(part.stats.hidden, full.stats.hidden)
    np.testing.assert_allclose(
        part.stats.sample_embeddings, full.stats.sample_embeddings, atol=1e-6
    )
    np.testing.assert_array_equal(part.correct, full.correct)  # recomputed by alias match
    assert part.split_rows("test") == full.split_rows("test") and not part.is_mc
    (copy / "teacher" / "shard-00001.jsonl").unlink()
    with pytest.raises(ConfigError, match="teacher answers missing"):
        load_workdir(copy)
    d = _derangement(50, seed=3)
    assert sorted(d.tolist()) == list(range(50)) and not np.any(d == np.arange(50))


def test_fit_risk_and_calibrate_cli(
    workdirs: tuple[Path, Path], tiny_lm: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """`fit-risk` writes a risk model bound to the student; `calibrate --signal risk` with
    `--abstain-beta` writes calibration-risk.json with both thresholds (or names the
    smallest feasible alpha)."""
    import shutil

    import ssd_guard.models as models
    from ssd_guard.calibration import load_calibration
    from ssd_guard.cli import main
    from ssd_guard.scoring.risk import RiskModel

    monkeypatch.setattr(models, "shared_embedder", lambda *a, **k: TrigramEmbedder())
    monkeypatch.setattr(models, "shared_causal_lm", lambda *a, **k: tiny_lm)
    qa, _ = workdirs
    art = tmp_path / "student"
    shutil.copytree(qa / "artifact", art)
    assert main(["fit-risk", "--workdir", str(qa), "--artifact", str(art)]) == 0
    assert "risk_model" in capsys.readouterr().out
    from ssd_guard.artifact import load_artifact

    fingerprint = load_artifact(art)[0].fingerprint
    model = RiskModel.load(art, fingerprint=fingerprint)
    assert set(model.variants) == {"pre", "post", "post_gen"}
    assert (qa / "token_stats.safetensors").exists()  # cached for the next run
    rc = main(
        [
            "calibrate",
            "--workdir",
            str(qa),
            "--artifact",
            str(art),
            "--signal",
            "risk",
            "--alpha",
            "0.95",
            "--delta",
            "0.2",
            "--abstain-beta",
            "0.9",
        ]
    )
    text = capsys.readouterr()
    assert rc == 0, text.err
    cal = load_calibration(art / "calibration-risk.json", fingerprint=fingerprint)
    assert cal.signal == "risk" and cal.abstain_beta == 0.9
    assert sum(cal.shares.values()) == pytest.approx(1.0)
    assert "at most 95% are wrong" in text.out
    # An unreachable target is refused, saying what is feasible.
    args = ["calibrate", "--workdir", str(qa), "--artifact", str(art), "--signal", "risk"]
    assert main([*args, "--alpha", "0.01", "--out", str(tmp_path / "x.json")]) != 0
    assert "feasible" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_fit_risk_leave_one_source_out_report(
    workdirs: tuple[Path, Path], tiny_lm: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """Two pooled sources: `fit-risk --report` chooses each variant's inputs and C leave-one-
    source-out, stores the chosen inputs in the risk model and reports the per-source test
    table (the stored model and leave-one-source-out)."""
    import shutil

    import ssd_guard.models as models
    from ssd_guard.artifact import load_artifact
    from ssd_guard.cli import main
    from ssd_guard.scoring.risk import RISK_INPUTS, RiskModel

    monkeypatch.setattr(models, "shared_embedder", lambda *a, **k: TrigramEmbedder())
    monkeypatch.setattr(models, "shared_causal_lm", lambda *a, **k: tiny_lm)
    qa, _ = workdirs
    wd = tmp_path / "pooled"
    shutil.copytree(qa, wd)
    rows = [json.loads(x) for x in (wd / "prompts.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["source"] = "first" if (i // 2) % 2 == 0 else "second"  # both labels in each
    _jsonl(wd / "prompts.jsonl", rows)
    art, out = tmp_path / "student", tmp_path / "risk-loso.json"
    shutil.copytree(qa / "artifact", art)
    args = ["fit-risk", "--workdir", str(wd), "--artifact", str(art), "--report", str(out)]
    assert main([*args, "--loso-rows", "train+validation"]) == 0
    assert "test_loso" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["sources"] == ["first", "second"]
    assert report["selection"] == "leave-one-source-out"
    model = RiskModel.load(art, fingerprint=load_artifact(art)[0].fingerprint)
    for name, rep in report["variants"].items():
        assert set(rep["loso"]["candidates"]) == set(rep["candidates"])
        for row in rep["loso"]["candidates"].values():
            assert set(row["auroc"]) == {"first", "second"}
        choice = rep["choice"]
        assert choice["inputs"] == rep["candidates"][choice["candidate"]]
        assert list(model.variants[name].inputs) == choice["inputs"]
        assert model.info["variants"][name]["candidate"] == choice["candidate"]
        for key in ("test", "test_loso"):
            per = rep[key]["per_source"]
            assert set(per) == {"first", "second"}
            for r in per.values():
                assert set(r["single"]) == set(RISK_INPUTS[name])
                assert isinstance(r["combined_ge_best_single"], bool)
            assert isinstance(rep[key]["combined_ge_best_single_every_source"], bool)
