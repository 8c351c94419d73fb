"""Hostile model files and backend settings: --weights that are not checkpoints or carry code, a FAISS index of
another store, absurd factory strings and knobs, bad Milvus collection names.

New case = one line in WEIGHTS, FACTORIES or COLLECTIONS.
"""

from __future__ import annotations

import copy
import os
import pickle
import shlex
import shutil
import zipfile
from pathlib import Path

import pytest

import hostile_fixture as hf
import model_fixture
from cliplens.store import index_files
from cliplens.errors import BackendError
from cliplens.store import IndexStore

TINY = "cliplens-hostile-tiny"  # the tiny CLIP's config, registered with open_clip so --weights applies to it


@pytest.fixture(scope="module", autouse=True)
def _registered():
    from open_clip import factory

    factory._MODEL_CONFIGS[TINY] = copy.deepcopy(model_fixture.TINY_CONFIG)
    yield
    factory._MODEL_CONFIGS.pop(TINY, None)


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _torch_zip_with_code(path: Path, marker: Path) -> None:
    import torch

    torch.save({"state_dict": {"x": _RunsShell(marker)}}, path)  # a zip checkpoint whose pickle calls os.system


def _truncated(path: Path, marker: Path) -> None:
    model_fixture.write_tiny_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zip_without_pickle(path: Path, marker: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/readme.txt", "hello")


def _empty_safetensors(path: Path, marker: Path) -> None:
    from safetensors.torch import save_file

    save_file({}, str(path))


WEIGHTS = {  # name: (file name, builder(path, marker), words the error must contain)
    "a text file": ("model.pt", lambda p, m: p.write_text("not a model\n"), "not a model checkpoint"),
    "an empty file": ("model.bin", lambda p, m: p.write_bytes(b""), "not a model checkpoint"),
    "an image": ("model.pt", lambda p, m: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "not a model checkpoint"),
    "legacy pickle running code": ("model.bin", lambda p, m: p.write_bytes(pickle.dumps(_RunsShell(m), protocol=2)),
                                   "could not load"),
    "zip checkpoint running code": ("model.pt", _torch_zip_with_code, "could not load"),
    "truncated checkpoint": ("model.pt", _truncated, "could not load"),
    "zip without a pickle": ("model.pt", _zip_without_pickle, "could not load"),
    "garbage .safetensors": ("model.safetensors", lambda p, m: p.write_bytes(os.urandom(256)), "not a safetensors"),
    "empty .safetensors": ("model.safetensors", _empty_safetensors, "could not load"),
    "pickled list, not weights": ("model.bin", lambda p, m: p.write_bytes(pickle.dumps([1, 2, 3], protocol=2)),
                                  "could not load"),
}


@pytest.mark.parametrize("case", WEIGHTS)
def test_hostile_weights_file_is_one_line_and_runs_nothing(case, tmp_path, cifar_root, capsys):
    name, build, expect = WEIGHTS[case]
    marker = tmp_path / "pwned"
    weights = tmp_path / name
    build(weights, marker)
    before = hf.tree_digest(tmp_path)
    code, out, err = hf.cli(capsys, "index", "cifar100", "--data-dir", cifar_root, "--no-verify", "-q",
                            "--model", TINY, "--weights", weights, "--index-dir", tmp_path / "index")
    hf.assert_one_line_error(code, err, expect=expect)
    assert not marker.exists()  # torch.load(weights_only=True) refused the global: nothing ran
    assert hf.tree_digest(tmp_path) == before


def test_a_real_checkpoint_still_loads(tmp_path):
    from cliplens.encoder import load_encoder

    ckpt = model_fixture.write_tiny_checkpoint(tmp_path / "tiny.pt")
    assert load_encoder(TINY, None, weights=ckpt, device="cpu").info.weights_sha256


# --------------------------------------------------------------------------- FAISS

FACTORIES = {  # name: (factory string, options, words the error must contain); all refused before FAISS allocates
    "a billion inverted lists": ("IVF1000000000,Flat", {}, "inverted lists"),
    "4**20 IMI lists": ("IMI2x20,Flat", {}, "inverted lists"),
    "HNSW with 100 000 links": ("HNSW100000", {}, "neighbours per node"),
    "PQ with 24-bit codes": ("PQ8x24", {}, "24-bit codes"),
    "PQ with more parts than dimensions": ("PQ4096", {}, "sub-quantizers"),
    "LSH with 2**30 bits": ("LSH1073741824", {}, "over the limit"),
    "shell characters": ("Flat;rm -rf ~", {}, "only letters"),
    "10 kB factory string": ("HNSW32," * 1500, {}, "only letters"),
    "efSearch of a billion": ("HNSW32", {"ef_search": 10**9}, "efSearch must be"),
    "negative nprobe": ("IVF2,Flat", {"nprobe": -1}, "nprobe must be"),
}


@pytest.mark.parametrize("case", FACTORIES)
def test_absurd_faiss_settings_are_refused(case, tiny_index, tmp_path):
    pytest.importorskip("faiss", reason="the faiss extra is not installed")
    from cliplens.index.faiss_index import FaissIndex

    factory, options, expect = FACTORIES[case]
    index = shutil.copytree(tiny_index, tmp_path / "index")
    before = hf.tree_digest(index)
    with pytest.raises(BackendError, match=expect):
        FaissIndex.build(IndexStore.open(index), factory=factory, progress=False, **options)
    assert hf.tree_digest(index) == before  # refused before anything was built or written


def test_a_faiss_index_of_another_store_is_refused(tiny_index, tmp_path, capsys):
    pytest.importorskip("faiss", reason="the faiss extra is not installed")
    from cliplens.index.faiss_index import FaissIndex

    one, other = tmp_path / "one", tmp_path / "other"
    shutil.copytree(tiny_index, one)
    shutil.copytree(tiny_index, other)
    manifest = (index_files(other) / "manifest.json").read_text()
    (index_files(other) / "manifest.json").write_text(manifest.replace('"created": "', '"created": "1999-'))  # rebuilt since
    FaissIndex.build(IndexStore.open(one), factory="Flat", progress=False)
    shutil.copytree(one / "faiss", other / "faiss")  # copied beside another store
    with pytest.raises(BackendError, match="built for another index"):
        FaissIndex.open(IndexStore.open(other), factory="Flat")


# --------------------------------------------------------------------------- Milvus

COLLECTIONS = {  # name: collection name; each refused before any connection is made
    "path": "../../etc",
    "space": "my photos",
    "starts with a digit": "1photos",
    "too long": "c" * 300,
    "quote": "a'; drop",
    "unicode": "fotos_ñ",
}


@pytest.mark.parametrize("case", COLLECTIONS)
def test_bad_milvus_collection_names_are_refused_before_connecting(case, tiny_index):
    pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
    from cliplens.index.milvus_index import MilvusIndex

    with pytest.raises(BackendError, match="not a valid Milvus collection name"):
        MilvusIndex.open(IndexStore.open(tiny_index), uri="http://127.0.0.1:9", collection=COLLECTIONS[case])
