"""folder_index.py: counts, incremental runs (unchanged, added, updated, removed, renamed), resume, CLI."""

from __future__ import annotations

import json
import os
import shutil

import folder_fixture
import numpy as np
import pytest
from PIL import Image

from cliplens.sources.folder import decode_image
from cliplens.errors import DatasetError
from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.store import IndexStore, index_files

OPTS = FolderIndexOptions(batch_size=4, progress=False)


class CountingEncoder:
    """The tiny encoder, counting the images it embeds; ``fail_after`` simulates a crash mid-run."""

    def __init__(self, encoder, fail_after: int | None = None):
        self.encoder, self.info = encoder, encoder.info
        self.images = 0
        self.fail_after = fail_after

    def preprocess(self, images):
        return self.encoder.preprocess(images)

    def encode_pixels(self, pixels):
        if self.fail_after is not None and self.images >= self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        self.images += len(pixels)
        return self.encoder.encode_pixels(pixels)


@pytest.fixture
def photos(tmp_path):
    return folder_fixture.make_folder(tmp_path / "photos")


def _rows(index_dir):
    store = IndexStore.open(index_dir)
    return store, {p: i for i, p in enumerate(store.items["path"])}


def test_first_run_counts_and_columns(photos, tmp_path, tiny_encoder, caplog):
    enc = CountingEncoder(tiny_encoder)
    out = tmp_path / "index"
    s = index_folder(photos, enc, out, options=OPTS)
    good = len(folder_fixture.GOOD)
    assert (s.added, s.updated, s.removed, s.reused, s.unchanged, s.skipped, s.total) == (good, 0, 0, 0, 0, 3, good)
    assert dict(s.skipped_files).keys() == set(folder_fixture.BAD)
    # the bomb and the corrupt file stop at their headers; the truncated PNG fails mid-decode, in its batch,
    # where a blank stand-in keeps the batch shape and its row is then dropped
    assert enc.images == good + 1
    assert sum("skipped" in r.message for r in caplog.records) == 3  # one warning each
    store, rows = _rows(out)
    assert list(store.items["path"]) == sorted(folder_fixture.GOOD)
    assert list(store.items["ref"]) == list(store.items["path"])
    m = store.manifest
    assert m.source.type == "folder" and m.source.root == str(photos.resolve())
    assert m.folder["summary"]["added"] == good and len(m.folder["skipped"]) == 3
    assert store.items["caption"][rows["a.png"]] == "a caption for a"
    assert json.loads(store.items["meta"][rows["sub/deep/c.webp"]])["tags"] == ["x"]
    st = (photos / "e.bmp").stat()
    assert (store.items["size"][rows["e.bmp"]], store.items["mtime_ns"][rows["e.bmp"]]) == (st.st_size, st.st_mtime_ns)
    assert not list(out.glob(".build-*")) and not list(out.rglob("*.tmp"))  # no scratch left behind
    # the stored vectors are the encoder's own for the decoded (EXIF-rotated) image
    want = tiny_encoder.encode_images([decode_image(photos / "rotated.jpg", max_pixels=10**8)])[0]
    np.testing.assert_allclose(store.embeddings[rows["rotated.jpg"]], want, atol=1e-5)
    assert np.allclose(np.linalg.norm(store.embeddings, axis=1), 1, atol=1e-5)


def test_second_run_changes_nothing_and_embeds_nothing(photos, tmp_path, tiny_encoder):
    out = tmp_path / "index"
    index_folder(photos, tiny_encoder, out, options=OPTS)
    before = (index_files(out) / "embeddings.npy").read_bytes()
    gen = index_files(out)
    enc = CountingEncoder(tiny_encoder)
    s = index_folder(photos, enc, out, options=OPTS)
    assert enc.images == 0
    assert (s.added, s.updated, s.removed, s.reused, s.unchanged) == (0, 0, 0, 0, len(folder_fixture.GOOD))
    assert index_files(out) == gen and (gen / "embeddings.npy").read_bytes() == before  # not even rewritten


def test_incremental_rename_modify_delete_add(photos, tmp_path, tiny_encoder, rng):
    out = tmp_path / "index"
    index_folder(photos, tiny_encoder, out, options=OPTS)
    old, old_rows = _rows(out)
    b_vec = np.array(old.embeddings[old_rows["sub/b.jpg"]])
    e_vec = np.array(old.embeddings[old_rows["e.bmp"]])
    del old

    os.rename(photos / "sub/b.jpg", photos / "moved-b.jpg")  # renamed: reused by content hash
    st = (photos / "e.bmp").stat()
    Image.fromarray(folder_fixture.noise(rng, 20, 30)).save(photos / "e.bmp")  # modified, same size
    os.utime(photos / "e.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (photos / "f.tiff").unlink()  # deleted
    Image.fromarray(folder_fixture.noise(rng, 24, 24)).save(photos / "new.png")  # added
    shutil.copy(photos / "a.png", photos / "copy-of-a.png")  # a copy: reused too
    os.utime(photos / "d.gif")  # touched only: same content, unchanged

    enc = CountingEncoder(tiny_encoder)
    s = index_folder(photos, enc, out, options=OPTS)
    assert (s.added, s.updated, s.removed, s.reused, s.skipped) == (1, 1, 1, 2, 3)
    assert s.unchanged == len(folder_fixture.GOOD) - 3  # b moved, e changed, f deleted
    assert enc.images == 2  # only new.png and the modified e.bmp went through the model
    store, rows = _rows(out)
    assert "sub/b.jpg" not in rows and "f.tiff" not in rows
    np.testing.assert_array_equal(store.embeddings[rows["moved-b.jpg"]], b_vec)
    np.testing.assert_array_equal(store.embeddings[rows["copy-of-a.png"]], store.embeddings[rows["a.png"]])
    assert not np.allclose(store.embeddings[rows["e.bmp"]], e_vec)
    want = tiny_encoder.encode_images([decode_image(photos / "e.bmp", max_pixels=10**8)])[0]
    np.testing.assert_allclose(store.embeddings[rows["e.bmp"]], want, atol=1e-5)
    assert store.items["sha256"][rows["moved-b.jpg"]] == old_sha(photos / "moved-b.jpg")


def old_sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_interrupted_run_resumes_without_re_embedding(photos, tmp_path, tiny_encoder):
    out = tmp_path / "index"
    crashing = CountingEncoder(tiny_encoder, fail_after=4)  # dies after the first batch of 4
    with pytest.raises(KeyboardInterrupt):
        index_folder(photos, crashing, out, options=FolderIndexOptions(batch_size=4, progress=False, workers=1))
    with pytest.raises(Exception, match="is unfinished"):
        IndexStore.open(out)
    enc = CountingEncoder(tiny_encoder)
    s = index_folder(photos, enc, out, options=FolderIndexOptions(batch_size=4, progress=False, workers=1))
    assert s.added == len(folder_fixture.GOOD)
    assert enc.images == len(folder_fixture.GOOD) + 1 - 4  # the 10 decodable headers, less the first batch
    fresh = tmp_path / "fresh"
    index_folder(photos, tiny_encoder, fresh, options=FolderIndexOptions(batch_size=4, progress=False, workers=1))
    np.testing.assert_array_equal(IndexStore.open(out).embeddings, IndexStore.open(fresh).embeddings)


def test_options_exclude_hidden_and_max_megapixels(photos, tmp_path, tiny_encoder):
    out = tmp_path / "index"
    opts = FolderIndexOptions(exclude=("skipme/*",), include_hidden=True, max_megapixels=0.002, batch_size=8,
                              progress=False)
    s = index_folder(photos, tiny_encoder, out, options=opts)
    paths = set(IndexStore.open(out).items["path"])
    assert "skipme/x.png" not in paths and set(folder_fixture.HIDDEN) <= paths
    assert "a.png" not in paths and any("over the limit" in r for p, r in s.skipped_files if p == "a.png")


def test_empty_folder_and_cifar_index_dir_are_refused(tmp_path, tiny_encoder, tiny_index):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        index_folder(tmp_path / "empty", tiny_encoder, tmp_path / "out", options=OPTS)
    photos = folder_fixture.make_folder(tmp_path / "photos")
    cifar = tmp_path / "cifar-copy"
    shutil.copytree(tiny_index, cifar)
    with pytest.raises(DatasetError, match="not a folder index"):
        index_folder(photos, tiny_encoder, cifar, options=OPTS)


def test_cli_index_folder_then_search(photos, tmp_path, tiny_model, capsys):
    from cliplens.cli import main

    out = tmp_path / "index"
    argv = ["index", str(photos), "--index-dir", str(out), "--model", tiny_model, "--device", "cpu", "-q",
            "--batch-size", "4"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert f"{len(folder_fixture.GOOD)} added, 0 updated, 0 removed, 0 reused, 3 skipped" in line
    assert main(argv) == 0
    assert "0 added, 0 updated, 0 removed, 0 reused, 3 skipped" in capsys.readouterr().out
    assert main(["search", "red", "square", "--index-dir", str(out), "-k", "3", "--json",
                 "--where", "path=sub/*"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == "red square" and {h["ref"] for h in result["hits"]} == {"sub/b.jpg", "sub/deep/c.webp"}
    assert main(["search", "--image", str(photos / "a.png"), "--index-dir", str(out), "-k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"][0]["ref"] == "a.png" and result["hits"][0]["score"] == pytest.approx(1, abs=1e-4)
