"""``ssd-guard artifact DIR`` runs the checks :meth:`SSDScorer.load` runs -- one shared
function, :func:`ssd_guard.scoring.ssd.verify_artifact` -- so a manifest edited in a way
load refuses is refused by the command too, exit status 1 and load's own message.

The tiny artifact (its base model is the tiny random LM, loaded by path) runs every case
fast; the bundled student is checked on a copy of its directory (integration).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.artifacts import LAYER, _build_artifact

from ssd_guard.artifact import bundled_artifact_path
from ssd_guard.cli import main
from ssd_guard.errors import SSDGuardError

Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _copy(src: Path, dst: Path, edit: Edit | None = None, *, risk: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not risk:
        for name in ("risk.safetensors", "calibration-risk.json"):
            (dst / name).unlink(missing_ok=True)
    if edit is not None:
        mpath = dst / "manifest.json"
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        edit(manifest)
        mpath.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return dst


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["artifact", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _load_error(path: Path) -> str:
    """What ``SSDScorer.load`` says about the artifact at *path* (it must refuse it)."""
    from ssd_guard.scoring.ssd import SSDScorer

    with pytest.raises(SSDGuardError) as info:
        SSDScorer.load(path, device="cpu")
    return str(info.value)


# ------------------------------------------------------------------ tiny artifact
@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Any) -> Path:
    return _build_artifact(tmp_path_factory.mktemp("verify-artifact"), tiny_lm, layer=LAYER)


def test_an_unedited_artifact_passes_and_prints_its_manifest(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssd_guard.scoring.ssd import SSDScorer

    art = _copy(tiny_artifact, tmp_path / "art")
    SSDScorer.load(art, device="cpu")  # load takes it ...
    rc, out, err = _cli(capsys, str(art))  # ... and so does the command
    assert rc == 0, err
    info = json.loads(out)
    assert info["base_model"]["hidden_size"] > 0
    assert any(k.startswith("heads.risk.") for k in info["tensors"])
    assert info["verified"]["base_model"] == "matches"
    assert info["verified"]["student_fingerprint"] == SSDScorer.load(art, device="cpu").fingerprint


#: Manifest edits that ``SSDScorer.load`` refuses (the weights' sha256 still matches:
#: only the manifest changes), and whether the refusal needs the base model loaded.
REFUSED: dict[str, tuple[Edit, bool]] = {
    "head hidden size": (_set("heads.answer.hidden", 7), False),
    "head dim beyond the PCA": (_set("heads.risk.dim", 99), False),
    "head without tensors": (
        lambda m: m["heads"].update({"extra": dict(m["heads"]["risk"])}),
        False,
    ),
    "layer beyond the base model": (
        lambda m: m.update({"layer": 9, "features": {"layers": [3, 9]}}),
        False,
    ),
    "embedder dim": (_set("embedder.dim", 385), False),
    "base model hidden size": (_set("base_model.hidden_size", 33), False),  # head in_dim
    "base model fingerprint": (_set("base_model.fingerprint", "0123456789abcdef"), True),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_manifest_edit_load_refuses_fails_the_command_with_loads_message(
    case: str, tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, needs_models = REFUSED[case]
    art = _copy(tiny_artifact, tmp_path / "art", edit)
    message = _load_error(art)
    rc, out, err = _cli(capsys, str(art))
    assert rc == 1 and out == ""
    assert err == f"ssd-guard: error: {message}\n"
    # The offline checks (no base model) catch every edit that needs no model.
    rc, out, err = _cli(capsys, str(art), "--no-models")
    if needs_models:
        assert rc == 0 and json.loads(out)["verified"]["base_model"] == "skipped (--no-models)"
    else:
        assert rc == 1 and err == f"ssd-guard: error: {message}\n"


def test_the_messages_say_what_is_wrong(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "head hidden size": "artifact head 'answer': its tensors do not have the shapes",
        "head dim beyond the PCA": "more than the answer PCA's",
        "head without tensors": "lists head 'extra' but holds no tensors",
        "layer beyond the base model": "artifact reads layer 9, but its base model",
        "embedder dim": "answer PCA reads 384-dim embeddings",
        "base model hidden size": "(in_dim=33, dim=4",
        "base model fingerprint": "fingerprint 0123456789abcdef",
    }
    for i, (case, fragment) in enumerate(cases.items()):
        art = _copy(tiny_artifact, tmp_path / f"art{i}", REFUSED[case][0])
        rc, _, err = _cli(capsys, str(art))
        assert rc == 1 and fragment in err, (case, err)


def test_a_tampered_weights_file_is_still_refused(
    tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = _copy(tiny_artifact, tmp_path / "art")
    with (art / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x00\x00\x01")
    rc, _, err = _cli(capsys, str(art), "--no-models")
    assert rc == 1 and "does not match the manifest's" in err


# ------------------------------------------------------------------ bundled artifact
@pytest.mark.integration
def test_a_bundled_copy_passes_and_an_edited_one_fails_like_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = bundled_artifact_path()
    rc, out, err = _cli(capsys, str(_copy(src, tmp_path / "unedited")))
    assert rc == 0, err
    info = json.loads(out)
    assert info["verified"] == {
        "student_fingerprint": info["verified"]["student_fingerprint"],
        "risk_model": True,
        "base_model": "matches",
    }
    edits: dict[str, tuple[Edit, bool, str]] = {
        # The manifest now belongs to another student than the risk model was fitted for.
        "base fingerprint": (
            _set("base_model.fingerprint", "0123456789abcdef"),
            True,
            "was fitted for the student with fingerprint",
        ),
        # Without the risk model, the base model itself refuses it.
        "base fingerprint, no risk model": (
            _set("base_model.fingerprint", "0123456789abcdef"),
            False,
            "got HuggingFaceTB/SmolLM2-135M-Instruct with fingerprint",
        ),
        "head shape, no risk model": (
            _set("heads.risk.hidden", 128),
            False,
            "artifact head 'risk': its tensors do not have the shapes",
        ),
    }
    for i, (case, (edit, risk, fragment)) in enumerate(edits.items()):
        art = _copy(src, tmp_path / f"edited{i}", edit, risk=risk)
        message = _load_error(art)
        rc, out, err = _cli(capsys, str(art))
        assert rc == 1 and out == "", case
        assert err == f"ssd-guard: error: {message}\n" and fragment in message, (case, err)
