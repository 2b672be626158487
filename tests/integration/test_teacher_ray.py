"""The teacher stage on Ray Data (``teacher.backend: ray``) gives the single-process
teacher's results: the same answers for the same seeds, hidden states within 1e-5, and
it resumes from the shards already written. A real local Ray (``ray.init(num_cpus=2)``,
two actors) and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.recipes import smollm2_teacher_recipe

from ssd_guard.training.distill import pipeline
from ssd_guard.training.distill.recipe import Recipe
from ssd_guard.training.distill.workdir import Context, Workdir, load_teacher_all

pytestmark = pytest.mark.integration
import ray  # noqa: E402  (the ray extra: installed by scripts/install.sh, so never skipped)


def _recipe(workdir: Path, **teacher: object) -> Recipe:
    return smollm2_teacher_recipe(workdir, n_samples=3, **teacher)


def _teacher(recipe: Recipe) -> tuple[list[dict[str, object]], torch.Tensor, torch.Tensor | None]:
    pipeline.run_pipeline(recipe, progress=False, until="teacher")
    return load_teacher_all(Workdir(Path(recipe.workdir)))


def test_ray_teacher_equals_the_single_process_teacher_and_resumes(tmp_path: Path) -> None:
    one = _teacher(_recipe(tmp_path / "hf"))
    ray_recipe = _recipe(tmp_path / "ray", backend="ray", workers=2, threads_per_worker=1)
    # A killed run first: the prompts stage and one shard, then the rest on Ray.
    pipeline.run_pipeline(ray_recipe, progress=False, until="prompts")
    wd = Workdir(Path(ray_recipe.workdir))
    with pytest.raises(pipeline._Interrupted):
        pipeline.stage_teacher(wd, Context(ray_recipe), progress=False, stop_after_shards=1)
    assert not ray.is_initialized()  # the local Ray it started is shut down
    two = _teacher(ray_recipe)
    records_1, hidden_1, pooled_1 = one
    records_2, hidden_2, pooled_2 = two
    assert len(records_1) == 8 and [r["id"] for r in records_1] == [r["id"] for r in records_2]
    assert records_1 == records_2  # the same default answer and samples for every prompt
    assert any(len(set(r["samples"])) > 1 for r in records_1)  # really sampled (T = 1)
    assert (hidden_1.float() - hidden_2.float()).abs().max().item() <= 1e-5
    assert pooled_1 is not None and pooled_2 is not None
    assert (pooled_1.float() - pooled_2.float()).abs().max().item() <= 1e-5


def test_switching_backend_does_not_resample(tmp_path: Path) -> None:
    """backend / workers are how the teacher runs, not what it samples: a work dir whose
    teacher ran in one process is complete for the Ray backend too."""
    hf = _recipe(tmp_path / "wd")
    pipeline.run_pipeline(hf, progress=False, until="teacher")
    seen: list[tuple[str, str]] = []
    ray_recipe = _recipe(tmp_path / "wd", backend="ray", workers=2)
    pipeline.run_pipeline(
        ray_recipe, progress=False, until="teacher", on_stage=lambda n, s, _t: seen.append((n, s))
    )
    assert ("teacher", "done") not in seen and not ray.is_initialized()
