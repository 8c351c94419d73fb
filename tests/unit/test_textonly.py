"""The torch-free text tower (cliplens.textonly) gives the torch text tower's vectors, and loads without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cliplens import textonly  # noqa: E402

TEXTS = ["a photo of a tractor.", "a photo of a tulip.", "a photo of a red tractor in the snow at night", "tractor",
         "", "  ", "café 🚜 &amp; <b>tag</b>", "日本語のテキスト", "word " * 120, "a photo of a", "a photo of a 🦭."]


@pytest.fixture(scope="module")
def cache(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("textonly")
    folder = textonly.build_cache(tiny_encoder, root=root)
    assert folder is not None and (folder / "meta.json").is_file()
    return root, folder


def test_cache_folder_holds_graph_weights_prefixes_and_parity(cache, tiny_encoder):
    root, folder = cache
    assert folder == textonly.cache_folder(tiny_encoder.info.name, tiny_encoder.info.weights_sha256, root=root)
    assert {p.name for p in folder.iterdir()} == {"meta.json", "text.onnx", "text.weights", "prefixes.npz"}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["weights_sha256"] == tiny_encoder.info.weights_sha256 and meta["prefixes"] == ["a photo of a"]
    assert meta["prefix_ids"] == [tiny_encoder.tokenizer(["a photo of a"])[0, :5].tolist()]  # sot + 4 words
    assert meta["parity_relative_max_error"] <= textonly.PARITY_TOLERANCE
    assert textonly.build_cache(tiny_encoder, root=root) == folder  # built once; a second call reuses it


@pytest.mark.parametrize("prepack", [False, True])
def test_same_vectors_as_the_torch_text_tower(cache, tiny_encoder, prepack):
    root, _ = cache
    ours = textonly.open_cached(tiny_encoder.info, root=root, prepack=prepack)
    assert ours is not None and ours.text_only
    want = tiny_encoder.encode_texts(TEXTS)
    got = ours.encode_texts(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    one_by_one = np.stack([ours.encode_texts([t])[0] for t in TEXTS])  # with and without the kept prefix
    assert np.abs(one_by_one - want).max() <= 1e-5
    assert ours.encode_texts([]).shape == (0, want.shape[1])


def test_loads_and_encodes_without_torch_or_open_clip(cache, tiny_encoder, tmp_path):
    root, _ = cache
    out = tmp_path / "vec.npy"
    code = (
        "import sys, types, numpy as np\n"
        "from cliplens import textonly\n"
        f"info = types.SimpleNamespace(name={tiny_encoder.info.name!r}, weights_sha256={tiny_encoder.info.weights_sha256!r})\n"
        f"enc = textonly.open_cached(info, root={str(root)!r})\n"
        f"np.save({str(out)!r}, enc.encode_texts({TEXTS!r}))\n"
        "print('torch' in sys.modules, 'open_clip' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "False"]
    assert np.abs(np.load(out) - tiny_encoder.encode_texts(TEXTS)).max() <= 1e-5


def test_no_cache_for_random_weights_or_a_missing_or_damaged_folder(cache, tiny_encoder, tmp_path):
    import types

    root, folder = cache
    assert textonly.cache_folder("m", None) is None
    assert textonly.open_cached(types.SimpleNamespace(name="m", weights_sha256=None), root=root) is None
    assert textonly.open_cached(tiny_encoder.info, root=tmp_path) is None  # not built there
    import shutil

    broken = textonly.cache_folder(tiny_encoder.info.name, tiny_encoder.info.weights_sha256, root=tmp_path / "b")
    shutil.copytree(folder, broken)
    (broken / "text.onnx").write_bytes(b"not an onnx file")
    assert textonly.open_cached(tiny_encoder.info, root=tmp_path / "b") is None  # ignored: torch path instead


def test_image_queries_need_the_full_model(cache, tiny_encoder):
    from cliplens.errors import ModelError

    ours = textonly.open_cached(tiny_encoder.info, root=cache[0])
    with pytest.raises(ModelError, match="image tower"):
        ours.encode_images([np.zeros((8, 8, 3), np.uint8)])


@pytest.mark.slow
def test_b32_parity(b32_encoder, tmp_path):
    folder = textonly.build_cache(b32_encoder, root=tmp_path)
    ours = textonly.open_cached(b32_encoder.info, root=tmp_path)
    assert folder is not None and ours is not None
    assert np.abs(ours.encode_texts(TEXTS) - b32_encoder.encode_texts(TEXTS)).max() <= 1e-5
