from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from helpers.tiny import build_tiny_lm  # noqa: E402

pytest_plugins = ["helpers.redis_server"]


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_path: Path):
    from ssd_guard.models import load_causal_lm

    return load_causal_lm(str(tiny_lm_path), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def minilm():
    from ssd_guard.models import shared_embedder

    return shared_embedder(device="cpu")


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny tensors: one intra-op thread (more only add synchronisation on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
