"""Tiny random causal LMs built in-test (no download): a BPE tokenizer trained on a few
sentences and a 4-layer Llama or Gemma-3 with a 32-dim hidden state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from helpers.paths import DATA

_CORPUS_FILES = ("triviaqa_40.jsonl", "arc_20.jsonl")


def _corpus() -> list[str]:
    lines = []
    for name in _CORPUS_FILES:
        for row in (DATA / name).read_text().splitlines():
            obj = json.loads(row)
            lines.append(obj.get("context") or obj.get("query"))
            lines.extend(obj.get("aliases", [])[:3] + obj.get("choices", []))
    return [*lines, "Question: What is the capital of France?\nAnswer: Paris\n\n"]


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.padding_side = "left"
    fast.save_pretrained(path)
    return fast


def build_tiny_lm(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random causal LM + tokenizer to ``path`` and return it."""
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(**common, head_dim=8, sliding_window=16)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_student_artifact(
    root: Path,
    lm: Any,
    *,
    layer: int,
    pca: Any,
    x: Any,
    z: Any,
    embedder: tuple[str, int] = ("all-MiniLM-L6-v2", 384),
    few_shot: str = "",
    n_components: int = 3,
    hidden: int = 16,
    depth: int = 2,
    max_epochs: int = 2,
    dims: tuple[int, int] = (4, 8),
) -> Path:
    """Fit small risk/answer heads on ``x [N, H]`` -> ``z [N, S, D]`` and save a complete
    artifact (PCA, heads, calibration, manifest) for the tiny LM ``lm``."""
    from ssd_guard.artifact import (
        BaseModelInfo,
        EmbedderInfo,
        HeadInfo,
        Manifest,
        PromptFormat,
        save_artifact,
    )
    from ssd_guard.student import SSDStudent

    tensors: dict[str, Any] = dict(pca.tensors())
    heads = {}
    for name, d in zip(("risk", "answer"), dims):
        st = SSDStudent(
            n_components, hidden, depth, max_epochs=max_epochs, batch_size=16, seed=0, device="cpu"
        ).fit(x, z[..., :d])
        tensors.update({f"heads.{name}.{k}": v for k, v in st.state_tensors().items()})
        heads[name] = HeadInfo(
            dim=d,
            n_components=n_components,
            hidden=hidden,
            depth=depth,
            min_scale=st.min_scale,
            val_nll=0.0,
        )
    tensors["calibration.entropy"] = torch.linspace(-5, 5, 11)
    tensors["calibration.loglik"] = torch.linspace(-20, 0, 11)
    manifest = Manifest(
        base_model=BaseModelInfo(
            id=lm.model_id,
            fingerprint=lm.fingerprint,
            hidden_size=lm.hidden_size,
            num_layers=lm.num_layers,
        ),
        layer=layer,
        embedder=EmbedderInfo(id=embedder[0], dim=embedder[1]),
        pca_dim=pca.dim,
        heads=heads,
        prompt=PromptFormat(few_shot=few_shot),
    )
    return save_artifact(root, manifest, tensors)
