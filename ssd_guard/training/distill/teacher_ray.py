"""The teacher stage on Ray Data: shards spread over actors, one model per actor.

``teacher.backend: ray`` in a recipe. Each shard is one row of a Ray dataset; a pool of
``teacher.workers`` actors (each loads the base model once, with
``teacher.threads_per_worker`` CPU threads, or a GPU each when the driver has them) maps
shards to their samples with :func:`~ssd_guard.training.distill.pipeline.sample_shard` —
the very function the single-process teacher runs, with the same per-shard seed — so the
answers are the same and the hidden states equal up to float rounding. The driver writes
each shard as it arrives, so a killed run resumes from the shards already written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ssd_guard.errors import require_extra
from ssd_guard.training.distill.recipe import Recipe
from ssd_guard.training.distill.teacher import sample_shard

__all__ = ["sample_shards_on_ray"]

log = logging.getLogger("ssd_guard.distill")


class _ShardSampler:
    """A Ray Data actor: loads the base model once, then samples the shards it is given."""

    def __init__(self, recipe_json: str, threads: int, device: str | None) -> None:
        from ssd_guard.models import load_causal_lm

        torch.set_num_threads(threads)
        self.recipe = Recipe.model_validate_json(recipe_json)
        self.lm = load_causal_lm(self.recipe.base_model, device=device, dtype=self.recipe.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import json

        out: dict[str, list[Any]] = {"shard": [], "records": [], "hidden": [], "pooled": []}
        for index, rows in zip(batch["shard"], batch["rows"], strict=True):
            records, tensors = sample_shard(self.lm, self.recipe, int(index), json.loads(rows))
            out["shard"].append(int(index))
            out["records"].append(json.dumps(records))
            # bf16 has no numpy dtype: ship the exact bf16 bits as int16
            out["hidden"].append(_bits(tensors["hidden"]))
            out["pooled"].append(_bits(tensors["pooled"]) if "pooled" in tensors else b"")
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def _bits(t: torch.Tensor) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, t.contiguous().view(torch.int16).numpy(), allow_pickle=False)
    np.save(buf, np.array(t.shape, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def _unbits(data: bytes) -> torch.Tensor:
    import io

    buf = io.BytesIO(data)
    bits = np.load(buf, allow_pickle=False)
    shape = tuple(int(x) for x in np.load(buf, allow_pickle=False))
    return torch.from_numpy(bits).view(torch.bfloat16).reshape(shape)


def sample_shards_on_ray(
    recipe: Recipe, chunks: dict[int, list[dict[str, Any]]]
) -> Iterator[tuple[int, list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """``(shard index, records, tensors)`` for every shard in *chunks*, in completion
    order, sampled by a Ray Data actor pool."""
    require_extra("ray", "ray", "teacher.backend: ray")
    import json

    import ray

    t = recipe.teacher
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": t.ray_address} if t.ray_address else {}
        if not t.ray_address:
            kwargs["num_cpus"] = t.workers * t.threads_per_worker
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        started = True
    try:
        gpus = 1 if torch.cuda.is_available() else 0
        items = [{"shard": s, "rows": json.dumps(rows)} for s, rows in sorted(chunks.items())]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        mapped = ds.map_batches(
            _ShardSampler,
            fn_constructor_kwargs={
                "recipe_json": recipe.model_dump_json(),
                "threads": t.threads_per_worker,
                "device": recipe.device,
            },
            batch_size=1,
            concurrency=t.workers,
            num_cpus=t.threads_per_worker,
            num_gpus=gpus,
        )
        log.info("[teacher] %d shard(s) on Ray, %d worker(s)", len(items), t.workers)
        for row in mapped.iter_rows():
            tensors = {"hidden": _unbits(row["hidden"])}
            if row["pooled"]:
                tensors["pooled"] = _unbits(row["pooled"])
            yield int(row["shard"]), json.loads(row["records"]), tensors
    finally:
        if started:
            ray.shutdown()
