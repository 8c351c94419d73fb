"""A model's first exact indexing run prepares the image-only tower in a helper process (cliplens.imageonly.prepare):
the helper loads torch and open_clip, writes the graph and open_clip's embeddings of probe images, and exits; this
process checks the graph against them, caches it and indexes with it. Models whose tower cannot be cached are
remembered; a model that cannot be loaded is the same one-line error as loading it here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import model_fixture  # noqa: E402

from cliplens import imageonly  # noqa: E402
from cliplens.encoder import load_encoder  # noqa: E402
from cliplens.errors import ModelError  # noqa: E402


@pytest.fixture(autouse=True)
def image_only_on(monkeypatch):
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")


def _prepare(root, name, **kwargs):
    return imageonly.prepare(name=name, pretrained=kwargs.pop("pretrained", None), weights=kwargs.pop("weights", None),
                             device="cpu", root=root, announce=False, **kwargs)


def _no_helper(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("no helper process should start")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_the_first_run_caches_a_tower_equal_to_open_clips(tmp_path, tiny_model, tiny_encoder, rng):
    ours = _prepare(tmp_path, tiny_model)
    assert ours is not None and ours.info == tiny_encoder.info  # the record an index keeps
    folder = imageonly.cache_folder(tiny_encoder.info, root=tmp_path)
    assert ours.folder == folder and sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no scratch left
    assert sorted(p.name for p in folder.iterdir()) == ["image.onnx", "image.onnx.weights", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["parity"]["min_cosine"] >= imageonly.MIN_COSINE and meta["parity"]["max_abs"] <= imageonly.MAX_ABS
    assert meta["parity"]["images"] == 4
    images = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    want = tiny_encoder.encode_images(images)  # the torch tower of the same weights
    assert np.abs(ours.encode_images(images) - want).max() <= 1e-5
    found = imageonly.find(name=tiny_model, pretrained=None, weights=None, device="cpu", root=tmp_path)
    assert found is not None and np.abs(found.encode_images(images) - want).max() <= 1e-5


def test_a_model_that_cannot_load_is_the_same_error_as_loading_it(tmp_path, monkeypatch):
    with pytest.raises(ModelError) as here:
        load_encoder("ViT-B-33", "openai", device="cpu")
    with pytest.raises(ModelError) as helper:
        _prepare(tmp_path, "ViT-B-33", pretrained="openai")
    assert str(helper.value) == str(here.value) and "did you mean" in str(helper.value)
    missing = tmp_path / "gone.safetensors"
    with pytest.raises(ModelError) as here:
        load_encoder("ViT-B-32", None, weights=missing, device="cpu")
    with pytest.raises(ModelError) as helper:
        _prepare(tmp_path, "ViT-B-32", weights=missing)
    assert str(helper.value) == str(here.value)
    assert list(tmp_path.iterdir()) == []  # nothing remembered: the next run tries again
    _no_helper(monkeypatch)
    assert _prepare(tmp_path, "ViT-B-32") is None  # random weights: nothing to key a cache on, no helper


def test_a_tower_that_cannot_be_cached_is_remembered(tmp_path, monkeypatch):
    rn = model_fixture.write_tiny_resnet(Path(os.environ["HF_HOME"]))  # the hub cache conftest set up
    assert _prepare(tmp_path, rn) is None
    [marker] = (tmp_path / "declined").iterdir()
    assert json.loads(marker.read_text()) == {"status": "declined", "message": f"{rn} is not a ViT in CLIP's form"}
    assert [p.name for p in tmp_path.iterdir()] == ["declined"]
    _no_helper(monkeypatch)
    assert _prepare(tmp_path, rn) is None  # later runs load torch at once


def test_a_first_fast_run_caches_the_entry_its_bf16_tower_is_built_from(tmp_path, tiny_model, monkeypatch, rng):
    from cliplens._cpu import has_bf16

    if not has_bf16():  # fast mode's tower is not bf16 here: the usual fast load, and no helper for it
        _no_helper(monkeypatch)
        assert _prepare(tmp_path, tiny_model, precision="fast") is None
        return
    lean = _prepare(tmp_path, tiny_model, precision="fast")
    assert lean is not None and lean.info.precision == "fast:bf16" and not hasattr(lean, "session")
    usual = load_encoder(tiny_model, device="cpu", precision="fast", fast_backend="bf16")
    assert lean.info == usual.info  # what an index records: either load may extend it
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert np.abs(lean.encode_images(images) - usual.encode_images(images)).max() <= 1e-6  # the same bf16 arithmetic
    exact = imageonly.find(name=tiny_model, pretrained=None, weights=None, device="cpu", root=tmp_path)
    assert exact is not None and exact.info.precision == "exact"  # the entry, for later exact runs too


def test_the_default_model_by_its_tag_is_prepared_as_loading_it_names_it(tmp_path, b32_encoder, rng):
    # ViT-B-32 + openai: the tag needs QuickGELU, so loading switches to ViT-B-32-quickgelu (DESIGN.md's trap)
    ours = _prepare(tmp_path, "ViT-B-32", pretrained="openai")
    assert ours is not None and ours.info == b32_encoder.info and ours.info.name == "ViT-B-32-quickgelu"
    assert ours.meta["vit"]["activation"] == "quickgelu" and ours.image_grid == (7, 7)
    found = imageonly.find(name="ViT-B-32", pretrained="openai", weights=None, device="cpu", root=tmp_path)
    assert found is not None and found.info == b32_encoder.info
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert np.abs(ours.encode_images(images) - b32_encoder.encode_images(images)).max() <= 1e-5
