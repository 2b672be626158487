"""benchmarks/gpu_check.py runs on CPU with a tiny config (the GPU figures come from the
same script on a lent device): its JSON has every measurement, and the truncated prefill
returns exactly the full pass's hidden state at the layer read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from helpers.paths import ROOT


def test_gpu_check_runs_on_cpu_and_the_truncated_prefill_is_exact(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--config", "tiny", "--device", "cpu", "--reps", "2", "--warmup", "0"]
    argv += ["--batches", "1", "4", "--teacher-batch", "2", "--samples", "3", "--new-tokens", "4"]
    assert mod.main([*argv, "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text(encoding="utf-8"))
    assert result["meta"]["weights"].startswith("random")
    assert 0 < result["layer_read"] < result["num_layers"]
    pre = result["prefill_batch8"]
    assert pre["full_ms"] > 0 and pre["truncated_ms"] > 0
    assert pre["truncated_features_max_abs_diff"] <= 1e-4 * max(1.0, pre["reference_max_abs"])
    assert set(result["scoring_throughput"]) == {"1", "4"}
    assert all(v["prompts_per_s"] > 0 for v in result["scoring_throughput"].values())
    assert set(result["head_ms"]) == {"1", "64"}
    teacher = result["teacher"]
    assert teacher["samples_per_prompt"] == 4 and teacher["prompts_per_s"] > 0
    # the published architectures are there to be built on a device
    assert {"llama-3.1-8b", "qwen3-4b"} <= set(mod.CONFIGS)
