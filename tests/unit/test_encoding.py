import pytest
import torch

from ssd_guard.encoding import AnswerEmbedder, PCAProjection, PromptEncoder

TEXTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Question: Which planet is known as the red planet in our solar system?\nAnswer:",
    "Hi",
]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_truncated_prefill_matches_full_forward(arch: str, tiny_lm_path, tiny_gemma_path) -> None:
    from ssd_guard.models import load_causal_lm

    lm = load_causal_lm(
        str(tiny_lm_path if arch == "llama" else tiny_gemma_path), device="cpu", dtype="fp32"
    )
    n = lm.num_layers
    for layer in range(n + 1):
        fast = PromptEncoder(lm.model, lm.tokenizer, layer).encode(TEXTS)
        ref = PromptEncoder(lm.model, lm.tokenizer, layer, truncate=False).encode(TEXTS)
        assert fast.shape == (3, lm.hidden_size)
        assert torch.allclose(fast, ref, atol=1e-5), layer
        # Left padding is handled: each prompt alone gives the same state.
        alone = torch.cat([PromptEncoder(lm.model, lm.tokenizer, layer).encode([t]) for t in TEXTS])
        assert torch.allclose(fast, alone, atol=1e-4), layer


def test_truncation_skips_upper_layers(tiny_lm) -> None:
    calls: list[int] = []
    hooks = [
        blk.register_forward_hook(lambda *_a, i=i: calls.append(i))
        for i, blk in enumerate(PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 1).layers)
    ]
    try:
        PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 2).encode(TEXTS)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1]


def test_capture_during_generate_equals_encode(tiny_lm) -> None:
    enc = PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 3)
    batch = enc.tokenize(TEXTS)
    with enc.capture() as cap:
        tiny_lm.model.generate(
            **batch, max_new_tokens=3, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id
        )
    assert cap.hidden is not None
    # generate() derives position ids from the mask, like the encoder does.
    assert torch.allclose(cap.hidden, enc.encode(TEXTS), atol=1e-4)


def test_layer_out_of_range(tiny_lm) -> None:
    with pytest.raises(ValueError, match="out of range"):
        PromptEncoder(tiny_lm.model, tiny_lm.tokenizer, 99)


def test_pca_fit_transform_and_truncate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 10, generator=g) @ torch.randn(10, 10, generator=g)
    pca = PCAProjection.fit(x, 6, whiten=True)
    z = pca.transform(x)
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(6), atol=1e-3)
    assert torch.allclose(pca.truncate(3).transform(x), z[:, :3])
    again = PCAProjection.from_tensors(pca.tensors())
    assert torch.equal(again.transform(x), z)


def test_answer_embedder_normalised(minilm) -> None:
    emb = AnswerEmbedder(minilm)
    raw = emb.embed_raw(["Paris", "the city of Paris", "a banana"])
    assert raw.shape == (3, 384)
    assert torch.allclose(raw.norm(dim=1), torch.ones(3), atol=1e-5)
    assert raw[0] @ raw[1] > raw[0] @ raw[2]
    with pytest.raises(RuntimeError, match="no PCA"):
        emb.embed(["x"])


def test_answer_embedder_direct_path_equals_encode(minilm) -> None:
    texts = ["Mars", "William Shakespeare", "the capital of Peru is Lima, on the coast", ""]
    emb = AnswerEmbedder(minilm)
    assert emb._direct_parts() is not None  # MiniLM: Transformer -> mean Pooling -> Normalize
    direct = emb.embed_raw(texts)  # short batch: direct transformer call
    ref = minilm.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float().cpu()
    assert torch.allclose(direct, ref, atol=1e-5)
    many = emb.embed_raw(texts * 3)  # longer batch: sentence-transformers encode
    assert torch.allclose(many, ref.repeat(3, 1), atol=1e-5)


def test_answer_embedder_direct_path_follows_a_swapped_model(minilm) -> None:
    import copy

    emb = AnswerEmbedder(minilm)
    first = emb.embed_raw(["Mars"])
    emb.model = copy.deepcopy(minilm).to(torch.bfloat16)
    parts = emb._direct_parts()
    assert parts is not None and next(parts[1].parameters()).dtype == torch.bfloat16
    assert torch.allclose(emb.embed_raw(["Mars"]), first, atol=2e-2)
