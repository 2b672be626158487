"""Shared test helpers (moved from test_evaluate.py; used by several test modules)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from helpers.paths import DATA
from helpers.tiny import save_student_artifact

FEW_SHOT = "Question: What is the capital of France?\nAnswer: Paris\n\n"

LAYER = 2

K = 5

E = 16


class TrigramEmbedder:
    """A deterministic stand-in for a sentence-transformers model (hashed trigrams)."""

    def get_sentence_embedding_dimension(self) -> int:
        return E

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
    ) -> Any:
        out = np.full((len(texts), E), 1e-3, dtype=np.float32)
        for i, t in enumerate(texts):
            s = f"  {t.lower()}  "
            for j in range(len(s) - 2):
                out[i, zlib.crc32(s[j : j + 3].encode()) % E] += 1.0
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return torch.from_numpy(out) if convert_to_tensor else out


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def build_workdir(root: Path, lm: Any, *, mc: bool = False, seed: int = 0) -> Path:
    """Write a complete work directory; even rows are 'known' (right, consistent answers)."""
    from ssd_guard.encoding import PCAProjection

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    src = [
        json.loads(x)
        for x in (DATA / ("arc_20.jsonl" if mc else "triviaqa_40.jsonl")).read_text().splitlines()
    ]
    prompts, teacher, labels = [], [], []
    for i, r in enumerate(src):
        known = i % 2 == 0
        if mc:
            prompt = r["query"] + "\nAnswer:"
            right = r["choices"][r["gold"]]
            row = {"id": str(i), "prompt": prompt, "choices": r["choices"], "gold": r["gold"]}
        else:
            prompt, right = r["context"], r["answer"]
            row = {
                "id": str(i),
                "prompt": prompt,
                "answer": right,
                "aliases": [right, *r["aliases"]],
            }
        row["text"] = FEW_SHOT + prompt
        prompts.append(row)
        if known:
            default, samples = right, [right] * (K - 1) + [right.lower()]
        else:
            words = [
                "zebra",
                "quartz",
                "violin",
                "nebula",
                "saffron",
                "glacier",
                "tundra",
                "cobalt",
            ]
            picks = rng.choice(len(words), size=K + 1, replace=False)
            default, samples = f"{words[picks[0]]} {i}", [words[p] for p in picks[1:]]
        teacher.append({"id": str(i), "default": default, "samples": samples})
        labels.append({"id": str(i), "correct": known, "default": default})
    n = len(prompts)
    order = rng.permutation(n)
    n_tr, n_va = n // 2, n // 5
    split = {
        "train": [str(i) for i in order[:n_tr]],
        "validation": [str(i) for i in order[n_tr : n_tr + n_va]],
        "test": [str(i) for i in order[n_tr + n_va :]],
    }
    known = np.array([i % 2 == 0 for i in range(n)])
    _jsonl(root / "prompts.jsonl", prompts)
    (root / "split.json").write_text(json.dumps(split))
    _jsonl(root / "labels.jsonl", labels)
    (root / "recipe.json").write_text(
        json.dumps(
            {
                "name": "tiny-mc" if mc else "tiny-qa",
                "teacher": {
                    "n_samples": K,
                    "temperature": 1.0,
                    "default_temperature": 0.0,
                    "max_new_tokens": 4,
                },
            }
        )
    )
    hidden = torch.from_numpy(
        rng.normal(size=(n, lm.num_layers + 1, lm.hidden_size)).astype(np.float32)
    )
    hidden[:, LAYER, :4] += torch.from_numpy(np.where(known, 2.0, -2.0)[:, None].astype(np.float32))
    hidden = hidden.to(torch.bfloat16)
    (root / "teacher").mkdir()
    half = n // 2
    for s, (a, b) in enumerate([(0, half), (half, n)]):
        save_file(
            {"hidden": hidden[a:b].contiguous()},
            str(root / "teacher" / f"shard-{s:05d}.safetensors"),
        )
        _jsonl(root / "teacher" / f"shard-{s:05d}.jsonl", teacher[a:b])
    save_file({"hidden": hidden}, str(root / "features.safetensors"))
    (root / "layers.json").write_text(json.dumps({"best": LAYER, "table": []}))

    emb = TrigramEmbedder()
    flat = [t for r in teacher for t in (r["default"], *r["samples"])]
    raw = torch.from_numpy(emb.encode(flat)).view(n, K + 1, E)
    default_e, samples_e = raw[:, 0].contiguous(), raw[:, 1:].contiguous()
    save_file({"default": default_e, "samples": samples_e}, str(root / "embeddings.safetensors"))
    tr = torch.tensor([int(i) for i in split["train"]])
    pca = PCAProjection.fit(torch.cat([samples_e[tr].reshape(-1, E), default_e[tr]]), 8)
    save_file(
        {k: v.contiguous() for k, v in pca.tensors(prefix="").items()},
        str(root / "pca.safetensors"),
    )

    x = hidden[:, LAYER].float()
    z = pca.transform(samples_e)
    save_student_artifact(
        root / "artifact",
        lm,
        layer=LAYER,
        pca=pca,
        x=x[tr],
        z=z[tr],
        embedder=("trigram", E),
        few_shot=FEW_SHOT,
        n_components=2,
        depth=1,
        max_epochs=15,
    )
    return root
