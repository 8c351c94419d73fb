"""The torch-free image tower (cliplens.imageonly): built from the torch tower, equal to it to fp32 rounding, found
only for the model and weights it was built from, and a damaged or foreign cache is never used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cliplens import imageonly  # noqa: E402


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model):
    from cliplens.encoder import load_encoder

    root = tmp_path_factory.mktemp("imageonly")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPLENS_IMAGE_ONLY", "1")
        encoder = load_encoder(tiny_model, device="cpu")
        encoder.encode_images(np.zeros((2, 32, 32, 3), np.uint8))  # packed, as after an indexing run
        folder = imageonly.build_cache(encoder, root=root)
    assert folder is not None and (folder / "meta.json").is_file()
    return root, folder, encoder


def _find(root, tiny_model, **kw):
    return imageonly.find(**{"name": tiny_model, "pretrained": None, "weights": None, "device": "cpu", "root": root,
                             **kw})


def test_image_only_tower_equals_the_torch_tower(cache, tiny_model, rng):
    root, folder, torch_encoder = cache
    ours = _find(root, tiny_model)
    assert ours is not None and ours.info == torch_encoder.info  # the record an index keeps, unchanged
    assert ours.image_grid == tuple(torch_encoder.model.visual.grid_size)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["parity"]["min_cosine"] >= imageonly.MIN_COSINE and meta["parity"]["max_abs"] <= imageonly.MAX_ABS
    arrays = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)  # CIFAR-shaped, more than one slice
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
                [(40, 90), (300, 200), (17, 17)]]
    for images in (arrays, pictures):
        want, got = torch_encoder.encode_images(images), ours.encode_images(images)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5
        assert (got * want).sum(axis=1).min() >= 0.99999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(ours.preprocess(arrays), torch_encoder.preprocess(arrays))
    assert ours.encode_pixels(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, torch_encoder.info.embed_dim)
    with pytest.raises(ValueError, match="RGB"):
        ours.encode_images([pictures[0].convert("P")])  # open_clip resizes palettes as they are: torch only


def test_only_the_same_request_finds_the_cache(cache, tiny_model, tmp_path, monkeypatch):
    root, _, torch_encoder = cache
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not the same weights")
    assert _find(root, tiny_model, weights=other) is None  # another file
    assert _find(root, "ViT-B-32-quickgelu", pretrained="openai") is None  # another model
    assert _find(root, tiny_model, device="cuda") is None  # a GPU asked for: torch
    from cliplens.fast import has_bf16

    lean = _find(root, tiny_model, precision="fast")  # fast mode's bf16 tower, from the checkpoint (test_vit_torch.py)
    assert (lean is not None and lean.info.precision == "fast:bf16") if has_bf16() else lean is None
    assert _find(root, tiny_model, precision="fp16") is None
    monkeypatch.setattr(imageonly, "accelerator_present", lambda: True)
    assert _find(root, tiny_model, device="auto") is None  # auto, with a GPU present: torch
    assert _find(root, tiny_model, device="cpu") is not None
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "0")
    assert _find(root, tiny_model) is None and imageonly.build_cache(torch_encoder, root=tmp_path) is None


def test_random_weights_and_fast_precision_are_not_cached(tiny_model, tmp_path):
    import dataclasses

    from cliplens.encoder import load_encoder

    encoder = load_encoder(tiny_model, device="cpu")
    encoder.info = dataclasses.replace(encoder.info, weights_sha256=None)
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    encoder.info = dataclasses.replace(encoder.info, weights_sha256="ab" * 32, precision="fast:bf16")
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    assert list(tmp_path.iterdir()) == []
