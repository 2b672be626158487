"""The teacher stage on vLLM (``teacher.backend: vllm``), for real: vLLM's CPU build
samples SmolLM2-135M-Instruct's answers, transformers supplies the hidden states.

Not part of the main suite (vLLM pins its own torch and transformers and does not
install beside the rest): ``bash .ci/vllm`` builds a separate environment with the CPU
build of vLLM and runs this module with ``-m vllm``. A missing vLLM there is a failure.

Checks: K samples per prompt at T = 1 (really sampled), the same hidden states as the hf
teacher (the same prefill of the same text), the greedy default answers agree with
transformers' greedy answers, the stage resumes from the shards already written and
draws exactly the same answers again (per-request seeds), and a work dir switching from
hf to vllm resamples (vLLM's random numbers are not transformers')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.recipes import smollm2_teacher_recipe

from ssd_guard.training.distill import pipeline
from ssd_guard.training.distill.recipe import Recipe
from ssd_guard.training.distill.workdir import Context, Workdir, load_teacher_all

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

ENGINE = {"gpu_memory_utilization": 0.3, "max_model_len": 512, "enforce_eager": True}


def _recipe(workdir: Path, **teacher: object) -> Recipe:
    return smollm2_teacher_recipe(workdir, n_samples=4, **teacher)


def _teacher(recipe: Recipe) -> tuple[list[dict[str, object]], torch.Tensor, torch.Tensor | None]:
    pipeline.run_pipeline(recipe, progress=False, until="teacher")
    return load_teacher_all(Workdir(Path(recipe.workdir)))


def test_vllm_teacher_samples_resumes_and_matches_the_hf_states(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vllm  # noqa: F401  (selected with -m vllm: a missing vLLM fails here)

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache
    records_hf, hidden_hf, pooled_hf = _teacher(_recipe(tmp_path / "hf"))
    recipe = _recipe(tmp_path / "vllm", backend="vllm", vllm={"options": ENGINE, "batch_size": 4})
    pipeline.run_pipeline(recipe, progress=False, until="prompts")
    wd = Workdir(Path(recipe.workdir))
    # A killed run: one shard written, then the rest.
    with pytest.raises(pipeline._Interrupted):
        pipeline.stage_teacher(wd, Context(recipe), progress=False, stop_after_shards=1)
    first = wd.path("teacher", "shard-00000.jsonl")
    assert first.is_file() and not wd.path("teacher", "shard-00001.jsonl").exists()
    kept = first.stat().st_mtime_ns
    records, hidden, pooled = _teacher(recipe)
    assert first.stat().st_mtime_ns == kept  # the shard already written was not redone
    assert [r["id"] for r in records] == [r["id"] for r in records_hf]
    assert all(len(r["samples"]) == 4 for r in records)  # type: ignore[arg-type]
    assert all(isinstance(x, str) for r in records for x in r["samples"])  # type: ignore[attr-defined]
    assert any(len(set(r["samples"])) > 1 for r in records)  # type: ignore[arg-type]
    # The same model reading the same text: the states the hf teacher stored, up to one
    # bf16 rounding step (the hf teacher's prefill runs inside generate, batched with
    # other shapes; shards store bf16).
    assert torch.allclose(hidden.float(), hidden_hf.float(), rtol=2**-7, atol=1e-5)
    assert pooled is not None and pooled_hf is not None
    assert torch.allclose(pooled.float(), pooled_hf.float(), rtol=2**-7, atol=1e-5)
    # Greedy is greedy: vLLM's default answers are transformers' (fp32 on both).
    same = sum(a["default"] == b["default"] for a, b in zip(records, records_hf, strict=True))
    assert same >= 7, [(a["default"], b["default"]) for a, b in zip(records, records_hf)]
    # Seeded per request: a fresh run over another work dir draws the same answers.
    again, _, _ = _teacher(
        _recipe(tmp_path / "again", backend="vllm", vllm={"options": ENGINE, "batch_size": 8})
    )
    assert again == records
    # Switching an hf work dir to vllm resamples every shard.
    switched = _recipe(tmp_path / "hf", backend="vllm", vllm={"options": ENGINE})
    stats = pipeline.stage_teacher(Workdir(tmp_path / "hf"), Context(switched), progress=False)
    assert stats["resampled"] == stats["n_shards"] == 4
