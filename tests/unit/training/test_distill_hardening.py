"""`ssd-guard distill` checks what every stage depends on, picks its dtype and thread
count from the machine, keeps a killed run's time, and says what the artifact lacks; the
evaluation reads the artifact's own PCA and prints the answer signals' results."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.paths import DATA
from helpers.recipes import tiny_recipe

from ssd_guard.errors import ConfigError
from ssd_guard.training.distill import STAGES, pipeline
from ssd_guard.training.distill.workdir import Workdir, load_prompts, load_teacher

ROWS = (DATA / "triviaqa_40.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(rows), encoding="utf-8")
    return path


def _recipe(model: Path, workdir: Path, data: Path, limit: int = 12) -> Any:
    return tiny_recipe(model, workdir, data={"path": str(data), "limit": limit})


def _run(recipe: Any, **kw: Any) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    pipeline.run_pipeline(
        recipe, progress=False, on_stage=lambda n, s, _t: seen.append((n, s)), **kw
    )
    return seen


def _teacher(root: Path) -> tuple[list[dict[str, Any]], torch.Tensor]:
    return load_teacher(Workdir(root))


@pytest.fixture(scope="module")
def fresh_new(tiny_lm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory distilled (until labels) straight from the *new* questions."""
    base = tmp_path_factory.mktemp("fresh")
    data = _write(base / "new.jsonl", ROWS[20:32])
    pipeline.run_pipeline(_recipe(tiny_lm_path, base / "wd", data), progress=False, until="labels")
    return base / "wd"


# --------------------------------------------------------------------------- 1. dependencies
@pytest.mark.parametrize("how", ["same path, new content", "new path"])
def test_changed_data_file_reruns_teacher_on_the_new_questions(
    tiny_lm_path: Path, tmp_path: Path, fresh_new: Path, how: str
) -> None:
    old = _write(tmp_path / "qa.jsonl", ROWS[:12])
    r = _recipe(tiny_lm_path, tmp_path / "wd", old)
    _run(r, until="labels")
    before, _ = _teacher(tmp_path / "wd")
    if how == "new path":
        r = _recipe(tiny_lm_path, tmp_path / "wd", _write(tmp_path / "other.jsonl", ROWS[20:32]))
    else:
        _write(old, ROWS[20:32])
    seen = _run(r, until="labels")
    assert seen == [("prompts", "done"), ("teacher", "done"), ("labels", "done")]
    records, hidden = _teacher(tmp_path / "wd")
    assert records != before
    # Exactly what a fresh run on the new questions samples.
    want, want_hidden = _teacher(fresh_new)
    assert records == want and torch.equal(hidden, want_hidden)
    prompts = load_prompts(Workdir(tmp_path / "wd"))
    assert [p["prompt"] for p in prompts] == [json.loads(x)["context"] for x in ROWS[20:32]]
    labels = [json.loads(x) for x in (tmp_path / "wd" / "labels.jsonl").read_text().splitlines()]
    assert [x["default"] for x in labels] == [x["default"] for x in records]
    marker = json.loads((tmp_path / "wd" / "stages" / "teacher.done.json").read_text())
    assert marker["resampled"] == 3 and "stage:prompts" in marker["deps"]
    # Unchanged now: everything is skipped.
    assert all(s == "skipped" for _, s in _run(r, until="labels"))


def test_only_shards_whose_prompts_changed_are_resampled(
    tiny_lm_path: Path, tmp_path: Path
) -> None:
    data = _write(tmp_path / "qa.jsonl", ROWS[:12])
    r = _recipe(tiny_lm_path, tmp_path / "wd", data)
    _run(r, until="teacher")
    before, _ = _teacher(tmp_path / "wd")
    rows = list(ROWS[:12])
    rows[5] = ROWS[30]  # shard 1 (rows 4..7) asks another question
    _write(data, rows)
    _run(r, until="teacher")
    marker = json.loads((tmp_path / "wd" / "stages" / "teacher.done.json").read_text())
    assert marker["resampled"] == 1
    after, _ = _teacher(tmp_path / "wd")
    assert after[:4] == before[:4] and after[8:] == before[8:] and after[4:8] != before[4:8]
    fresh = _recipe(tiny_lm_path, tmp_path / "fresh", _write(tmp_path / "fresh.jsonl", rows))
    _run(fresh, until="teacher")
    assert after == _teacher(tmp_path / "fresh")[0]

    # Fewer prompts: the shards past the end go (they would be read as answers).
    _run(_recipe(tiny_lm_path, tmp_path / "wd", data, limit=6), until="labels")
    assert len(list((tmp_path / "wd" / "teacher").glob("shard-*.jsonl"))) == 2
    assert [x["id"] for x in _teacher(tmp_path / "wd")[0]] == [str(i) for i in range(6)]

    # --force teacher samples every shard again.
    _run(_recipe(tiny_lm_path, tmp_path / "wd", data, limit=6), until="teacher", force=("teacher",))
    marker = json.loads((tmp_path / "wd" / "stages" / "teacher.done.json").read_text())
    assert marker["resampled"] == 2


def test_rerun_reason_is_logged(tiny_lm_path: Path, tmp_path: Path, caplog: Any) -> None:
    data = _write(tmp_path / "qa.jsonl", ROWS[:8])
    r = _recipe(tiny_lm_path, tmp_path / "wd", data, limit=8)
    _run(r, until="teacher")
    _write(data, ROWS[10:18])
    with caplog.at_level(logging.INFO, logger="ssd_guard.training.distill"):
        _run(r, until="teacher")
    text = caplog.text
    assert f"[prompts] rerunning: changed since its last run: data file {data}" in text
    assert "[teacher] rerunning: changed since its last run: the output of stage 'prompts'" in text


def test_load_workdir_refuses_stages_older_than_their_inputs(
    tiny_lm_path: Path, tmp_path: Path
) -> None:
    from ssd_guard.training.workdir_data import load_workdir

    data = _write(tmp_path / "qa.jsonl", ROWS[:12])
    r = _recipe(tiny_lm_path, tmp_path / "wd", data)
    _run(r, until="features")
    assert len(load_workdir(tmp_path / "wd", need_hidden=False).prompts) == 12
    _write(data, ROWS[20:32])
    _run(r, until="prompts")  # new prompts, old teacher answers / labels / embeddings
    with pytest.raises(
        ConfigError, match=r"stale stage outputs: teacher \(older than prompts\); labels"
    ):
        load_workdir(tmp_path / "wd", need_hidden=False)


def test_token_stats_cache_follows_the_answers(tiny_lm: Any, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ssd_guard.scoring.token_stats import teacher_forced_token_stats
    from ssd_guard.training.risk_fit import workdir_token_stats

    prompts = [{"id": str(i), "prompt": json.loads(ROWS[i])["context"]} for i in range(4)]

    def data(default: list[str]) -> Any:
        return SimpleNamespace(
            root=tmp_path, prompts=prompts, stats=SimpleNamespace(default=default)
        )

    first = ["Onion", "Antelope", "Paris", "Lima"]
    a = workdir_token_stats(data(first), tiny_lm.model, tiny_lm.tokenizer)
    assert (tmp_path / "token_stats.safetensors").is_file()
    second = ["Onion", "Zebra", "Paris", "Lima"]  # same row count, one answer changed
    b = workdir_token_stats(data(second), tiny_lm.model, tiny_lm.tokenizer)
    texts = [p["prompt"] for p in prompts]
    want = teacher_forced_token_stats(tiny_lm.model, tiny_lm.tokenizer, texts, second)
    assert b == pytest.approx(want, nan_ok=True)
    assert a[1] != pytest.approx(b[1])


# --------------------------------------------------------------------------- 2. dtype
def test_auto_dtype_follows_the_cpu_bf16_support(monkeypatch: Any, caplog: Any) -> None:
    from ssd_guard import models

    cpu = torch.device("cpu")
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert models.auto_dtype(cpu, flags=avx2, capability="AVX2")[0] == torch.float32
    assert models.auto_dtype(cpu, flags=avx2 | {"avx512f"}, capability="AVX512")[0] == (
        torch.float32
    )
    assert models.auto_dtype(cpu, flags=avx2 | {"avx512_bf16"})[0] == torch.bfloat16
    assert models.auto_dtype(cpu, flags=avx2 | {"amx_bf16"})[0] == torch.bfloat16
    assert models.auto_dtype(cpu, flags={"fp", "asimd", "bf16"})[0] == torch.bfloat16  # AArch64
    assert models.auto_dtype("cuda", cuda_bf16=True)[0] == torch.bfloat16
    assert models.auto_dtype("cuda", cuda_bf16=False)[0] == torch.float32
    # The flags are read from /proc/cpuinfo's "flags" line.
    info = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16\n\nprocessor\t: 1\n"
    assert models.cpu_flags(info) == {"fpu", "sse", "avx2", "avx512_bf16"}
    assert models.cpu_flags("no flags here") is None

    # `auto` on an AVX2-only CPU is fp32 (bf16 would be emulated), logged with the reason.
    from ssd_guard import devices  # where the dtype choice lives (models re-exports it)

    monkeypatch.setattr(devices, "cpu_flags", lambda cpuinfo=None: frozenset(avx2))
    monkeypatch.setattr(devices, "_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(devices, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="ssd_guard.models"):
        assert models.resolve_dtype("auto", cpu) == torch.float32
    (rec,) = [r for r in caplog.records if getattr(r, "event", None) == "dtype.auto"]
    assert rec.dtype == "fp32" and rec.device == "cpu"  # type: ignore[attr-defined]
    assert "no native bf16" in rec.reason  # type: ignore[attr-defined]
    assert rec.getMessage().startswith("dtype.auto dtype=fp32 device=cpu reason=")
    monkeypatch.setattr(devices, "cpu_flags", lambda cpuinfo=None: frozenset({"avx512_bf16"}))
    assert models.resolve_dtype("auto", cpu) == torch.bfloat16
    assert models.resolve_dtype("fp32", cpu) == torch.float32


# --------------------------------------------------------------------------- 3. threads
_CPUINFO_2C4T = "".join(
    f"processor\t: {p}\nphysical id\t: 0\ncore id\t\t: {p % 2}\n\n" for p in range(4)
)


def test_default_threads_are_physical_cores_the_process_may_use() -> None:
    from ssd_guard.models import default_num_threads, resolve_threads

    # 2 cores x 2 hyper-threads: 2 threads, not 4.
    assert default_num_threads(cpuinfo=_CPUINFO_2C4T, affinity={0, 1, 2, 3}, cgroup={})[0] == 2
    # Pinned to one logical CPU, or a cgroup quota of one CPU: 1.
    assert default_num_threads(cpuinfo=_CPUINFO_2C4T, affinity={0}, cgroup={})[0] == 1
    quota = {"/sys/fs/cgroup/cpu.max": "150000 100000"}
    n, why = default_num_threads(cpuinfo=_CPUINFO_2C4T, affinity={0, 1, 2, 3}, cgroup=quota)
    assert n == 2 and "cgroup quota 2" in why
    quota = {"/sys/fs/cgroup/cpu.max": "100000 100000"}
    assert default_num_threads(cpuinfo=_CPUINFO_2C4T, affinity={0, 1, 2, 3}, cgroup=quota)[0] == 1
    # No topology in cpuinfo: the CPUs allowed.
    assert default_num_threads(cpuinfo="", affinity={0, 1, 2}, cgroup={})[0] == 3

    assert resolve_threads(3, env={"OMP_NUM_THREADS": "8"}) == (3, resolve_threads(3)[1])
    n_env, source = resolve_threads(None, env={"OMP_NUM_THREADS": "8"})
    assert n_env is None and source == "OMP_NUM_THREADS=8"
    assert resolve_threads(None, env={})[1].startswith("default: min(")


def test_pipeline_sets_threads_and_restores_them(
    tiny_lm_path: Path, tmp_path: Path, caplog: Any
) -> None:
    data = _write(tmp_path / "qa.jsonl", ROWS[:8])
    r = _recipe(tiny_lm_path, tmp_path / "wd", data, limit=8).model_copy(update={"threads": 1})
    before = torch.get_num_threads()
    seen: list[int] = []
    with caplog.at_level(logging.INFO, logger="ssd_guard.models"):
        pipeline.run_pipeline(
            r,
            progress=False,
            until="prompts",
            on_stage=lambda *a: seen.append(torch.get_num_threads()),
        )
    assert seen == [1] and torch.get_num_threads() == before
    (rec,) = [x for x in caplog.records if getattr(x, "event", None) == "threads"]
    assert rec.threads == 1  # type: ignore[attr-defined]
    # The argument (--threads) wins over the recipe.
    seen.clear()
    pipeline.run_pipeline(
        r,
        progress=False,
        until="prompts",
        threads=2,
        on_stage=lambda *a: seen.append(torch.get_num_threads()),
    )
    assert seen == [2] and torch.get_num_threads() == before


# --------------------------------------------------------------------------- 4. timings
def test_timings_keep_a_killed_runs_time(
    tiny_lm_path: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    data = _write(tmp_path / "qa.jsonl", ROWS[:12])
    r = _recipe(tiny_lm_path, tmp_path / "wd", data)
    real = pipeline.stage_teacher
    monkeypatch.setattr(pipeline, "stage_teacher", functools.partial(real, stop_after_shards=2))
    with pytest.raises(pipeline._Interrupted):
        pipeline.run_pipeline(r, progress=False, until="teacher")
    timings = json.loads((tmp_path / "wd" / "timings.json").read_text())
    killed = timings["teacher"]
    assert killed > 0
    monkeypatch.setattr(pipeline, "stage_teacher", real)
    spent: list[float] = []
    pipeline.run_pipeline(
        r,
        progress=False,
        until="teacher",
        on_stage=lambda n, s, t: spent.append(t) if n == "teacher" else None,
    )
    timings = json.loads((tmp_path / "wd" / "timings.json").read_text())
    assert timings["teacher"] == pytest.approx(killed + spent[0], abs=0.05)
    marker = json.loads((tmp_path / "wd" / "stages" / "teacher.done.json").read_text())
    assert marker["seconds"] == pytest.approx(timings["teacher"], abs=0.01)
    assert marker["resampled"] == 1
    assert not (tmp_path / "wd" / "stages" / "teacher.progress.json").exists()


# --------------------------------------------------------------------------- CLI
def _sub_help(command: str) -> str:
    from ssd_guard.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return str(sub.choices[command].format_help())  # type: ignore[index]


def test_distill_help_lists_the_stages_and_threads() -> None:
    text = " ".join(_sub_help("distill").split())
    assert f"stop after this stage (one of: {', '.join(STAGES)})" in text
    assert "--threads N" in text and "OMP_NUM_THREADS" in text


def test_distill_cli_notes_the_missing_risk_model(tiny_lm_path: Path, tmp_path: Path) -> None:
    from ssd_guard.cli import main

    data = _write(tmp_path / "qa.jsonl", ROWS[:20])
    r = tiny_recipe(tiny_lm_path, tmp_path / "wd", data={"path": str(data)})
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(r.model_dump(mode="json")), encoding="utf-8")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["distill", "--config", str(cfg), "--quiet"]) == 0
    text = err.getvalue()
    assert out.getvalue().strip() == str(tmp_path / "wd")  # stdout: the work dir only
    art = tmp_path / "wd" / "artifact"
    assert "no combined risk model (risk.safetensors)" in text
    assert f"ssd-guard fit-risk --config {cfg} --artifact {art}" in text
    assert "refuse this student" in text
    assert "threads threads=" in text  # the thread count and why, logged


# --------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def evaluated(tiny_lm: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`ssd-guard evaluate` on a work dir whose pca.safetensors was refitted after the
    student was trained; records the projections TD-trace was given."""
    from helpers.workdirs import TrigramEmbedder, build_workdir
    from safetensors.torch import save_file

    import ssd_guard.models as models
    from ssd_guard.cli import main
    from ssd_guard.encoding import PCAProjection
    from ssd_guard.evaluation import runner, scorers

    base = tmp_path_factory.mktemp("eval")
    qa = build_workdir(base / "qa", tiny_lm)
    other = PCAProjection.fit(torch.randn(200, 16), 8)  # not the artifact's PCA
    save_file(
        {k: v.contiguous() for k, v in other.tensors(prefix="").items()},
        str(qa / "pca.safetensors"),
    )
    seen: list[Any] = []

    class Recording(runner.TeacherDispersion):  # type: ignore[misc,name-defined]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            if self.projection is not None:
                seen.append(self.projection)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "shared_embedder", lambda *a, **k: TrigramEmbedder())
        mp.setattr(models, "shared_causal_lm", lambda *a, **k: tiny_lm)
        # TD-std / TD-trace are built in scorers, the student-space TD in runner
        mp.setattr(scorers, "TeacherDispersion", Recording)
        mp.setattr(runner, "TeacherDispersion", Recording)
        args = ["evaluate", "--workdir", str(qa), "--out", str(base / "out"), "--n-boot", "20"]
        with contextlib.redirect_stdout(out):
            assert main([*args, "--cost-prompts", "0", "-q"]) == 0
    return {"stdout": out.getvalue(), "projections": seen, "workdir": qa, "other": other}


def test_evaluate_prints_post_generation_results(evaluated: dict[str, Any]) -> None:
    text = evaluated["stdout"]
    assert "before generation" in text and "after generation" in text
    for name in ("SSD ", "TD-trace", "SSD-loglik", "SSD-pmi", "SSD-consensus", "TD-answer"):
        assert name in text, name
    assert "answer mismatch" in text


def test_td_trace_student_space_uses_the_artifacts_pca(evaluated: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    art = load_file(str(evaluated["workdir"] / "artifact" / "model.safetensors"))
    (proj,) = evaluated["projections"]
    mean, comps, _ = proj
    d = comps.shape[0]
    assert torch.allclose(torch.as_tensor(mean), art["pca.mean"].float())
    assert torch.allclose(torch.as_tensor(comps), art["pca.components"][:d].float())
    assert not torch.allclose(torch.as_tensor(mean), evaluated["other"].mean)
    res = json.loads((evaluated["workdir"].parent / "out" / "results.json").read_text())
    assert any("student space" in k for k in res["fidelity"]["spearman_ssd_entropy_vs"])
