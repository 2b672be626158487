import json

import pytest
import torch

from ssd_guard.artifact import (
    BaseModelInfo,
    EmbedderInfo,
    HeadInfo,
    Manifest,
    check_compatible,
    load_artifact,
    save_artifact,
)
from ssd_guard.errors import ArtifactError, ArtifactIntegrityError, ArtifactMismatchError


def manifest() -> Manifest:
    return Manifest(
        base_model=BaseModelInfo(
            id="org/model", fingerprint="abc123", hidden_size=32, num_layers=4
        ),
        layer=2,
        embedder=EmbedderInfo(id="all-MiniLM-L6-v2", dim=384),
        pca_dim=32,
        heads={
            "risk": HeadInfo(dim=16, n_components=2, hidden=8, depth=1, min_scale=1e-3, val_nll=1.5)
        },
    )


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "c": torch.arange(7),
    }


def test_round_trip_is_bit_exact(tmp_path) -> None:
    save_artifact(tmp_path / "art", manifest(), tensors())
    m, t = load_artifact(tmp_path / "art")
    for k, v in tensors().items():
        assert t[k].dtype == v.dtype and torch.equal(t[k], v)
    assert m.base_model == manifest().base_model and len(m.weights_sha256) == 64
    assert len(m.fingerprint) == 16 and m.fingerprint != m.weights_sha256[:16]


def test_fingerprint_covers_every_score_relevant_manifest_field(tmp_path) -> None:
    """Changing the layer, the prompt's few-shot prefix or the features changes the scores,
    so it must change the fingerprint that shared caches key on."""
    from ssd_guard.features import FeatureSpec

    save_artifact(tmp_path / "art", manifest(), tensors())
    m, _ = load_artifact(tmp_path / "art")
    variants = [
        m.model_copy(update={"layer": m.layer - 1}),
        m.model_copy(update={"prompt": m.prompt.model_copy(update={"few_shot": "Q: x\nA: y\n\n"})}),
        m.model_copy(update={"features": FeatureSpec(layers=[1, 2])}),
    ]
    prints = {m.fingerprint, *(v.fingerprint for v in variants)}
    assert len(prints) == 4
    # The same manifest read twice keeps its fingerprint.
    assert load_artifact(tmp_path / "art")[0].fingerprint == m.fingerprint


def test_non_utf8_manifest_is_an_artifact_error(tmp_path) -> None:
    save_artifact(tmp_path / "art", manifest(), tensors())
    path = tmp_path / "art" / "manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"format_version"', b'"format\xff_version"'))
    with pytest.raises(ArtifactError, match="not UTF-8"):
        load_artifact(tmp_path / "art")
    assert not list((tmp_path / "art").glob("*.pt")) and not list((tmp_path / "art").glob("*.bin"))


def test_tampered_weights_are_refused(tmp_path) -> None:
    out = save_artifact(tmp_path / "art", manifest(), tensors())
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        load_artifact(out)


def test_tampered_manifest_hash_is_refused(tmp_path) -> None:
    out = save_artifact(tmp_path / "art", manifest(), tensors())
    m = json.loads((out / "manifest.json").read_text())
    m["weights_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactIntegrityError):
        load_artifact(out)


def test_missing_and_malformed(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="not a student artifact"):
        load_artifact(tmp_path)
    out = save_artifact(tmp_path / "art", manifest(), tensors())
    (out / "manifest.json").write_text('{"layer": "x"}')
    with pytest.raises(ArtifactError, match="invalid manifest"):
        load_artifact(out)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hidden_size": 64}, "hidden size: artifact expects 32, model has 64"),
        ({"fingerprint": "zzz", "model_id": "other/model"}, "trained on org/model"),
        ({"model_id": "other/model"}, "trained on org/model, got other/model"),
        ({"embedder_id": "all-mpnet-base-v2"}, "embedder: artifact expects all-MiniLM-L6-v2"),
        ({"embedder_dim": 768}, "embedder dim: artifact expects 384"),
    ],
)
def test_mismatch_is_refused_with_reason(kwargs, needle) -> None:
    with pytest.raises(ArtifactMismatchError, match=needle):
        check_compatible(manifest(), **kwargs)


def test_matching_passes() -> None:
    check_compatible(
        manifest(),
        model_id="org/model",
        fingerprint="abc123",
        hidden_size=32,
        embedder_id="sentence-transformers/all-MiniLM-L6-v2",
        embedder_dim=384,
    )
