"""``cliplens search`` answers plain text queries without torch once the text tower is cached, with the same
results as the torch path; image queries still load the model; ``serve`` loads the image tower only when asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cliplens.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory, cifar_root, tiny_model):
    out = tmp_path_factory.mktemp("textonly-cli") / "idx"
    assert main(["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(out),
                 "--model", tiny_model, "--batch-size", "16", "-q"]) == 0
    return out


def _search_subprocess(index: Path, *words: str) -> tuple[dict, bool]:
    code = ("import json, sys; from cliplens.cli import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))")
    run = subprocess.run([sys.executable, "-c", code, "search", *words, "--index-dir", str(index), "--json", "-k", "5"],
                         capture_output=True, text=True, env={**os.environ}, check=True)
    result_text, modules = run.stdout.rsplit("\n", 2)[0], json.loads(run.stdout.strip().splitlines()[-1])
    return json.loads(result_text), modules["torch"] or modules["open_clip"]


def test_text_search_is_torch_free_after_the_first_and_gives_the_same_hits(index, tiny_encoder, capsys):
    from cliplens import textonly
    from cliplens.search import Searcher
    from cliplens.store import IndexStore

    store = IndexStore.open(index)
    want = Searcher(encoder=tiny_encoder, store=store).search("tractor", 5)  # the torch path, in this process
    assert main(["search", "tractor", "--index-dir", str(index), "--json", "-k", "5"]) == 0  # builds the cache
    out, err = capsys.readouterr()
    assert textonly.cache_folder(tiny_encoder.info.name, tiny_encoder.info.weights_sha256).is_dir()
    got, loaded_torch = _search_subprocess(index, "tractor")
    assert not loaded_torch
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]
    assert np.allclose([h["score"] for h in got["hits"]], [h.score for h in want.hits], atol=1e-5)
    assert got["prompt"] == "a photo of a tractor." and got["query_class"] == want.query_class
    combined, loaded_torch = _search_subprocess(index, "2:red", "tractor", "-", "snow", "+", "#3")  # weights, items
    assert not loaded_torch and len(combined["hits"]) == 5 and 3 not in [h["id"] for h in combined["hits"]]


def test_an_image_query_loads_the_model(index, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "q.png")
    got, loaded_torch = _search_subprocess(index, str(tmp_path / "q.png"))
    assert loaded_torch and len(got["hits"]) == 5


def test_serve_encoder_loads_the_image_tower_only_for_images(index, tiny_encoder):
    import argparse

    from cliplens.cli.web import serve_encoder
    from cliplens.store import IndexStore

    args = argparse.Namespace(model=None, pretrained=None, weights=None, device="auto", precision="exact")
    manifest = IndexStore.open(index).manifest
    main(["search", "seal", "--index-dir", str(index), "-k", "1"])  # make sure the cache exists
    enc = serve_encoder(args, manifest)
    assert type(enc).__name__ == "TextFirstEncoder" and not enc.full_loaded
    texts = ["a photo of a seal.", "a photo of a telephone."]
    assert np.abs(enc.encode_texts(texts) - tiny_encoder.encode_texts(texts)).max() <= 1e-5
    assert not enc.full_loaded
    image = np.full((1, 32, 32, 3), 90, np.uint8)
    assert np.abs(enc.encode_images(image) - tiny_encoder.encode_images(image)).max() <= 1e-5
    assert enc.full_loaded
