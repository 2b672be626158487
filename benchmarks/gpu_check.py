"""GPU path check: the guard's hot paths on real model architectures, random weights.

Builds Llama-3.1-8B- and Qwen3-4B-architecture models from their configs with random
weights (no download: only the architecture matters for speed) and measures, on the
device:

* truncated prefill (the student's features, the forward pass stopping after the deepest
  layer read) vs a full prefill, batch 8 — and checks the truncated features equal the
  full pass's hidden states at that layer;
* batched scoring throughput (truncated prefill + student head + Rényi-2 entropy) at
  batch 1 / 8 / 64, prompts per second;
* student head latency (mixture density network + closed-form entropy) at batch 1 / 64;
* teacher sampling (one prefill per prompt, its KV cache shared by K + 1 rows, one batched
  decode loop) prompts per second.

Everything stays on the device inside a measurement (one host sync per decode step in
the teacher, as in the library); CUDA timings synchronise before reading the clock.

    python benchmarks/gpu_check.py --config llama-3.1-8b qwen3-4b     # on a GPU machine
    python benchmarks/gpu_check.py --config tiny --device cpu           # anywhere (the tests)

Writes ``benchmarks/results/gpu-<config>-<device>.json`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd_guard.encoding import PromptEncoder  # noqa: E402
from ssd_guard.features import FeatureSpec  # noqa: E402
from ssd_guard.generation import sample_token_ids  # noqa: E402
from ssd_guard.student import MixtureDensityNetwork  # noqa: E402

#: Architectures from their published configs (hidden sizes, layers, heads, vocab).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "arch": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "qwen3-4b": {
        "arch": "qwen3",
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "arch": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
    },
}


class _IdsOnly:
    """The tokenizer attributes :class:`PromptEncoder` sets up; the check feeds token ids."""

    padding_side = "right"
    pad_token: str | None = None
    eos_token = "<eos>"


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A causal LM of architecture *name* with random weights, on *device*."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = dict(CONFIGS[name])
    arch = spec.pop("arch")
    config_cls, model_cls = (
        (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    )
    config = config_cls(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config).to(dtype)
    return model.eval()


def _timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def _median_ms(fn: Callable[[], Any], now: Callable[[], float], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        times.append((now() - t0) * 1000)
    return float(statistics.median(times))


def run_check(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    prompt_tokens: int,
    batches: Sequence[int],
    reps: int,
    warmup: int,
    n_samples: int,
    new_tokens: int,
    teacher_batch: int,
) -> dict[str, Any]:
    model = build_model(name, device, dtype)
    now = _timer(device)
    n_layers = int(model.config.num_hidden_layers)
    layer = max(1, (2 * n_layers) // 3)  # a student reading two thirds of the way up
    encoder = PromptEncoder(model, _IdsOnly(), features=FeatureSpec(layers=[layer]))
    vocab = int(model.config.vocab_size)
    gen = torch.Generator(device=device).manual_seed(0)

    def ids(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(3, vocab, (batch, prompt_tokens), device=device, generator=gen)
        return x, torch.ones_like(x)

    head = MixtureDensityNetwork(encoder.out_dim, 32, 10, hidden=256, depth=3).to(device).eval()

    # 1. truncated vs full prefill (batch 8), and the truncated features are the full
    #    pass's hidden state at the layer read
    x8, m8 = ids(8)
    with torch.inference_mode():
        full_states = model(input_ids=x8, attention_mask=m8, output_hidden_states=True)
        reference = full_states.hidden_states[layer][:, -1, :].float()
        truncated = encoder.encode_ids(x8, m8)
    diff = float((truncated - reference).abs().max())
    scale = float(reference.abs().max())

    def full() -> Any:
        with torch.inference_mode():
            return model(input_ids=x8, attention_mask=m8, use_cache=False)

    full_ms = _median_ms(full, now, reps, warmup)
    trunc_ms = _median_ms(lambda: encoder.encode_ids(x8, m8), now, reps, warmup)

    # 2. batched scoring throughput; 3. head latency
    scoring: dict[str, Any] = {}
    for b in batches:
        xb, mb = ids(b)

        def score(xb: torch.Tensor = xb, mb: torch.Tensor = mb) -> torch.Tensor:
            with torch.inference_mode():
                return head(encoder.encode_ids(xb, mb)).renyi2_entropy()

        ms = _median_ms(score, now, reps, warmup)
        scoring[str(b)] = {"ms": ms, "prompts_per_s": b / (ms / 1000)}
    head_ms: dict[str, float] = {}
    for b in (1, 64):
        feats = torch.randn(b, encoder.out_dim, device=device)

        def run_head(feats: torch.Tensor = feats) -> torch.Tensor:
            with torch.inference_mode():
                return head(feats).renyi2_entropy()

        head_ms[str(b)] = _median_ms(run_head, now, reps, warmup)

    # 4. teacher sampling: K samples + one greedy answer per prompt, shared prefill; a stop
    #    table that never stops, so every row decodes new_tokens tokens (a fixed cost)
    stop = torch.zeros(vocab, dtype=torch.bool, device=device)
    xt, mt = ids(teacher_batch)

    def teacher() -> Any:
        with torch.inference_mode():
            return sample_token_ids(
                model,
                xt,
                mt,
                n_samples=n_samples,
                temperature=1.0,
                default_temperature=0.0,
                max_new_tokens=new_tokens,
                stop_table=stop,
                pad_token_id=0,
                generator=gen,
            )

    teacher_ms = _median_ms(teacher, now, max(1, reps // 2), min(warmup, 1))
    out: dict[str, Any] = {
        "config": name,
        "architecture": {k: v for k, v in CONFIGS[name].items()},
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(dtype).replace("torch.", ""),
        "layer_read": layer,
        "num_layers": n_layers,
        "prompt_tokens": prompt_tokens,
        "prefill_batch8": {
            "full_ms": full_ms,
            "truncated_ms": trunc_ms,
            "truncated_over_full": trunc_ms / full_ms,
            "truncated_features_max_abs_diff": diff,
            "reference_max_abs": scale,
        },
        "scoring_throughput": scoring,
        "head_ms": head_ms,
        "teacher": {
            "prompts": teacher_batch,
            "samples_per_prompt": n_samples + 1,
            "new_tokens": new_tokens,
            "ms": teacher_ms,
            "prompts_per_s": teacher_batch / (teacher_ms / 1000),
        },
    }
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", nargs="+", default=["llama-3.1-8b", "qwen3-4b"], choices=CONFIGS)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--samples", type=int, default=10, help="teacher samples K per prompt")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--teacher-batch", type=int, default=8)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = {
        "command": "python benchmarks/gpu_check.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "weights": "random (architecture from the published config; no download)",
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.config:
        result = run_check(
            name,
            device,
            dtype,
            prompt_tokens=args.prompt_tokens,
            batches=args.batches,
            reps=args.reps,
            warmup=args.warmup,
            n_samples=args.samples,
            new_tokens=args.new_tokens,
            teacher_batch=args.teacher_batch,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the model went out of scope with run_check
        path = args.out_dir / f"gpu-{name}-{device.type}.json"
        path.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n", encoding="utf-8")
        p = result["prefill_batch8"]
        rates = ", ".join(
            f"b{b}: {v['prompts_per_s']:.0f}/s" for b, v in result["scoring_throughput"].items()
        )
        print(
            f"{name} on {meta['device']}: truncated/full prefill "
            f"{p['truncated_over_full']:.2f}x, scoring {rates}, head "
            f"{result['head_ms']['1']:.2f} ms, teacher "
            f"{result['teacher']['prompts_per_s']:.1f} prompts/s -> {path}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
