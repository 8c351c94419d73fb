"""``cliplens index`` in exact mode runs without torch (cliplens.imageonly): the first exact CPU run of a model has
a helper process cache its image tower and indexes with it, later runs find it cached; folders and CIFAR splits get
vectors equal to the torch tower's to fp32 rounding, and a torch-built index is extended."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import folder_fixture  # noqa: E402

from cliplens import imageonly  # noqa: E402
from cliplens.cli import main  # noqa: E402
from cliplens.store import IndexStore  # noqa: E402

CODE = ("import json, sys; from cliplens.cli import main; rc = main(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}))")


def _index_subprocess(*argv, home, quiet=True) -> dict:
    env = {**os.environ, "CLIPLENS_HOME": str(home), "CLIPLENS_IMAGE_ONLY": "1"}
    run = subprocess.run([sys.executable, "-c", CODE, "index", *map(str, argv), *(["-q"] if quiet else [])],
                         capture_output=True, text=True, env=env, check=True)
    return {**json.loads(run.stdout.strip().splitlines()[-1]), "stderr": run.stderr}


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "0")  # runs in this process: the torch tower, for reference
    return tmp_path / "home"


def _vectors(index):
    store = IndexStore.open(index)
    refs = list(store.items["ref"])
    return dict(zip(refs, np.asarray(store.embeddings, np.float32)))


def test_folder_indexing_is_torch_free_from_the_first_run(home, tiny_model, tiny_encoder, tmp_path):
    photos = folder_fixture.make_folder(tmp_path / "photos")
    torch_run = tmp_path / "torch"
    assert main(["index", str(photos), "--index-dir", str(torch_run), "--model", tiny_model, "-q"]) == 0
    folder = imageonly.cache_folder(tiny_encoder.info, root=home / "cache" / "imageonly")
    assert not folder.exists()  # the torch tower, with the cache turned off
    first = tmp_path / "first"
    ran = _index_subprocess(photos, "--index-dir", first, "--model", tiny_model, home=home, quiet=False)
    assert (ran["rc"], ran["torch"], ran["open_clip"]) == (0, False, False)  # torch loaded in the helper only
    assert "preparing the image tower for torch-free indexing (once per model)" in ran["stderr"]
    assert (folder / "meta.json").is_file()
    want, got = _vectors(torch_run), _vectors(first)
    assert sorted(got) == sorted(want) and len(got) == len(folder_fixture.GOOD)
    for ref in want:
        assert np.abs(got[ref] - want[ref]).max() <= 1e-5
    assert IndexStore.open(first).manifest.model == IndexStore.open(torch_run).manifest.model  # the same record
    second = tmp_path / "second"
    ran = _index_subprocess(photos, "--index-dir", second, "--model", tiny_model, home=home, quiet=False)
    assert (ran["rc"], ran["torch"], ran["open_clip"]) == (0, False, False)
    assert "preparing" not in ran["stderr"]  # cached
    # Photos added to the torch-built index are embedded torch-free, beside the vectors already there.
    shutil.copy(photos / "a.png", photos / "a-copy.png")
    ran = _index_subprocess(photos, "--index-dir", torch_run, "--model", tiny_model, home=home)
    assert (ran["rc"], ran["torch"], ran["open_clip"]) == (0, False, False)
    grown = _vectors(torch_run)
    assert np.abs(grown["a-copy.png"] - want["a.png"]).max() <= 1e-5


def test_cifar_indexing_is_torch_free_and_equal(home, tiny_model, cifar_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    base = ["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--model", tiny_model,
            "--batch-size", "16"]
    assert main([*base, "--index-dir", str(first), "-q"]) == 0
    ran = _index_subprocess(*base[1:], "--index-dir", second, home=home)  # the first run of the model here
    assert (ran["rc"], ran["torch"], ran["open_clip"]) == (0, False, False)
    a, b = IndexStore.open(first), IndexStore.open(second)
    assert len(a) == len(b) and np.abs(np.asarray(a.embeddings) - np.asarray(b.embeddings)).max() <= 1e-5


def test_turned_off_it_loads_torch_and_open_clip(home, tiny_model, tmp_path):
    photos = folder_fixture.make_folder(tmp_path / "photos")
    assert _index_subprocess(photos, "--index-dir", tmp_path / "a", "--model", tiny_model, home=home)["rc"] == 0
    env = {**os.environ, "CLIPLENS_HOME": str(home), "CLIPLENS_IMAGE_ONLY": "0"}
    run = subprocess.run([sys.executable, "-c", CODE, "index", str(photos), "--index-dir", str(tmp_path / "b"),
                          "--model", tiny_model, "-q"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": True, "open_clip": True}


@pytest.mark.skipif(not __import__("cliplens.fast").fast.has_bf16(), reason="fast mode picks bf16 only on a CPU "
                    "with AVX512_BF16 or AMX")
def test_fast_mode_builds_its_bf16_tower_without_open_clip(home, tiny_model, tmp_path):
    photos = folder_fixture.make_folder(tmp_path / "photos")
    assert _index_subprocess(photos, "--index-dir", tmp_path / "exact", "--model", tiny_model, home=home)["rc"] == 0
    fast = ["--model", tiny_model, "--precision", "fast"]
    env = {**os.environ, "CLIPLENS_HOME": str(home), "CLIPLENS_IMAGE_ONLY": "0"}  # the usual fast load
    run = subprocess.run([sys.executable, "-c", CODE, "index", str(photos), "--index-dir", str(tmp_path / "usual"),
                          *fast, "-q"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"rc": 0, "torch": True, "open_clip": True}
    ran = _index_subprocess(photos, "--index-dir", tmp_path / "lean", *fast, home=home)
    assert (ran["rc"], ran["torch"], ran["open_clip"]) == (0, True, False)
    usual, lean = IndexStore.open(tmp_path / "usual"), IndexStore.open(tmp_path / "lean")
    assert lean.manifest.model == usual.manifest.model and lean.manifest.model.precision == "fast:bf16"
    want, got = _vectors(tmp_path / "usual"), _vectors(tmp_path / "lean")
    assert sorted(got) == sorted(want)
    for ref in want:
        assert np.abs(got[ref] - want[ref]).max() <= 1e-6  # the same bf16 arithmetic (normalised in numpy)
