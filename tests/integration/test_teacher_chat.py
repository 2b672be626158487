"""The teacher on an API model (``teacher.backend: chat``), for real: a tiny random LM
served on 127.0.0.1 by the OpenAI-compatible server, reached through langchain-openai's
ChatOpenAI (the openai client), with another tiny LM as the local proxy."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.recipes import tiny_recipe

from ssd_guard.answers import question_of
from ssd_guard.generation import prefill_states
from ssd_guard.integrations.openai_server import ChatServer
from ssd_guard.models import load_causal_lm
from ssd_guard.training.distill import pipeline
from ssd_guard.training.distill.workdir import Workdir, load_teacher_all


def _chat_recipe(proxy: Path, workdir: Path, url: str, cache: Path):
    chat = {
        "factory": "ssd_guard.integrations.langchain.teacher:openai_teacher",
        "model_id": "tiny-api",
        "options": {"base_url": url, "model": "tiny-api", "cache": str(cache)},
    }
    return tiny_recipe(proxy, workdir, teacher={"backend": "chat", "chat": chat, "pool": False})


def test_chat_teacher_samples_the_api_model_and_reads_the_proxy(
    tiny_lm_path: Path, tiny_gemma_path: Path, tmp_path: Path
) -> None:
    api_lm = load_causal_lm(str(tiny_lm_path), device="cpu", dtype="fp32")
    with ChatServer(api_lm, "tiny-api") as server:
        cache = tmp_path / "answers.jsonl"
        r = _chat_recipe(tiny_gemma_path, tmp_path / "wd", server.url, cache)
        pipeline.run_pipeline(r, progress=False, until="teacher")
        first = server.requests
        records, hidden, _ = load_teacher_all(Workdir(tmp_path / "wd"))
        prompts = [p for p in pipeline.load_prompts(Workdir(tmp_path / "wd"))]
        assert len(records) == len(prompts) == 20
        assert all(len(rec["samples"]) == r.teacher.n_samples for rec in records)
        assert first == 2 * len(prompts)  # one greedy request and one n=K request each
        # the answers are the served model's: the same request again gives the same texts
        q = question_of(prompts[0]["prompt"])
        base = (r.teacher.seed * 1_000_003 + 0) * 7919
        again = server.complete(
            {"messages": [{"role": "user", "content": q}], "n": 1, "temperature": 0,
             "max_tokens": r.teacher.max_new_tokens, "seed": base}
        )  # fmt: skip
        assert (
            again["choices"][0]["message"]["content"].split("\n")[0].strip()
            == (records[0]["default"])
        )
        # the hidden states are the proxy's, of the prompt text the student reads
        proxy = load_causal_lm(str(tiny_gemma_path), device="cpu", dtype="fp32")
        h, _ = prefill_states(proxy.model, proxy.tokenizer, [prompts[0]["text"]])
        torch.testing.assert_close(hidden[0].float(), h[0].float(), atol=2e-2, rtol=2e-2)
        # a new work dir with the same answer cache asks the API nothing again
        r2 = _chat_recipe(tiny_gemma_path, tmp_path / "wd2", server.url, cache)
        pipeline.run_pipeline(r2, progress=False, until="teacher")
        assert server.requests == first + 1  # only the direct request above
        records2, _, _ = load_teacher_all(Workdir(tmp_path / "wd2"))
        assert records2 == records
