"""A damaged, interrupted or disagreeing image-only cache is never used and never fails a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cliplens import imageonly  # noqa: E402


@pytest.fixture()
def built(tmp_path, tiny_model, monkeypatch):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")
    folder = imageonly.build_cache(encoder, root=tmp_path)
    assert folder is not None
    return tmp_path, folder, encoder


def _find(root, tiny_model):
    return imageonly.find(name=tiny_model, pretrained=None, weights=None, device="cpu", root=root)


@pytest.mark.parametrize("name", ["image.onnx", "image.onnx.weights"])
def test_a_truncated_graph_or_weights_file_is_ignored_with_a_warning(built, tiny_model, caplog, name):
    root, folder, _ = built
    damaged = folder / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 3])
    assert _find(root, tiny_model) is None
    assert "ignoring the image-only cache" in caplog.text


@pytest.mark.parametrize("meta", ["{not json", json.dumps({"format": 1}), json.dumps({"format": 99, "model": {}}),
                                  json.dumps([1, 2])])
def test_a_damaged_or_foreign_record_is_skipped(built, tiny_model, meta):
    root, folder, _ = built
    (folder / "meta.json").write_text(meta)
    assert _find(root, tiny_model) is None


def test_an_interrupted_build_leaves_nothing_that_is_used(built, tiny_model):
    root, folder, _ = built
    half = root / f".{folder.name}.tmp123"  # what a killed build leaves: no meta.json
    shutil.copytree(folder, half)
    (half / "meta.json").unlink()
    shutil.rmtree(folder)
    assert _find(root, tiny_model) is None


def test_a_tower_that_disagrees_is_not_cached(tmp_path, tiny_model, monkeypatch, caplog):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")
    real = imageonly.ImageOnlyEncoder.encode_pixels
    monkeypatch.setattr(imageonly.ImageOnlyEncoder, "encode_pixels",
                        lambda self, pixels: np.roll(real(self, pixels), 1, axis=1))  # wrong arithmetic
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    assert "differs from torch" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the temporary folder went too


def test_an_export_failure_is_a_warning_not_an_error(tmp_path, tiny_model, monkeypatch, caplog):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")

    def broken(visual, path):
        path.write_bytes(b"half a graph")  # e.g. the disk filled up
        raise OSError(28, "No space left on device")

    from cliplens import vit_onnx

    monkeypatch.setattr(vit_onnx, "write_graph", broken)
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    assert "could not prepare the image-only tower" in caplog.text and list(tmp_path.iterdir()) == []
