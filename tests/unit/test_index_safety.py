"""The index folder's guarantees: never touch what cliplens did not create, one writer, generations, full disks,
kill-safety without re-embedding, and nothing-to-do costing nothing (no model load)."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import folder_fixture
import numpy as np
import pytest
from PIL import Image

from cliplens import layout, writer
from cliplens.cli import main
from cliplens.embed import index_labeled
from cliplens.errors import ForeignFolderError, StoreSpaceError
from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.store import IndexStore, IndexWriter, index_files

OPTS = FolderIndexOptions(batch_size=4, progress=False, workers=1)


def tree(root: Path, skip: str | None = None) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or not str(p.relative_to(root)).startswith(skip))}


def one_line(capsys, code, needle):
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cliplens: error:"), err
    assert needle in err, err
    return err


class Counting:
    """The tiny encoder, counting the images it embeds; raises KeyboardInterrupt after ``fail_after`` images."""

    def __init__(self, encoder, fail_after=None):
        self.encoder, self.info, self.images, self.fail_after = encoder, encoder.info, 0, fail_after

    def preprocess(self, images):
        return self.encoder.preprocess(images)

    def encode_pixels(self, pixels):
        if self.fail_after is not None and self.images >= self.fail_after:
            raise KeyboardInterrupt
        self.images += len(pixels)
        return self.encoder.encode_pixels(pixels)


@pytest.fixture
def photos(tmp_path):
    return folder_fixture.make_folder(tmp_path / "photos")


def _cli(tiny_model, *argv):
    return ["index", *map(str, argv), "--model", tiny_model, "--device", "cpu", "-q", "--batch-size", "4"]


# --------------------------------------------------------------------------- 1. what cliplens did not create


def test_a_foreign_non_empty_folder_is_refused_untouched(photos, tmp_path, tiny_model, cifar_root, capsys):
    mine = tmp_path / "my-stuff"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "pending").mkdir()
    before = tree(mine)
    one_line(capsys, main(_cli(tiny_model, photos, "--index-dir", mine)), "is not empty (2 entries) and is not a "
                                                                           "cliplens index")
    one_line(capsys, main(["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir",
                           str(mine), "--model", tiny_model, "-q"]), "not a cliplens index")
    one_line(capsys, main(_cli(tiny_model, photos, "--index-dir", photos)), "not a cliplens index")  # the source itself
    assert tree(mine) == before and sorted(p.name for p in mine.iterdir()) == ["pending", "thesis.tex"]
    with pytest.raises(ForeignFolderError):
        IndexWriter(root=mine, identity={"count": 1, "dtype": "float32"}, dim=4).start()


def test_an_index_inside_the_photo_folder_is_skipped_and_the_photos_are_never_written(photos, tiny_encoder):
    out = photos / "my-index"
    before = tree(photos)
    first = index_folder(photos, tiny_encoder, out, options=OPTS)
    Image.open(photos / "a.png").save(out / "a-figure.png")  # an image inside the index folder
    again = index_folder(photos, tiny_encoder, out, options=OPTS)
    assert (again.added, again.total) == (0, first.total)
    assert not any(str(p).startswith("my-index") for p in IndexStore.open(out).items["path"])
    assert tree(photos, skip="my-index") == before  # nothing written inside the source folder


def test_a_users_pending_folder_in_the_index_folder_survives(photos, tmp_path, tiny_encoder, rng):
    out = tmp_path / "index"
    index_folder(photos, tiny_encoder, out, options=OPTS)
    (out / "pending").mkdir()
    (out / "pending" / "keep.txt").write_text("mine")
    Image.fromarray(folder_fixture.noise(rng, 20, 20)).save(photos / "new.png")
    s = index_folder(photos, tiny_encoder, out, options=OPTS)  # embeds new.png in cliplens's own scratch
    assert s.added == 1 and (out / "pending" / "keep.txt").read_text() == "mine"
    assert not list(out.glob(".build-*")) and not list(out.rglob("*.tmp"))


# --------------------------------------------------------------------------- 2. one writer at a time


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(photos, tmp_path, tiny_model, capsys):
    out = tmp_path / "index"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cliplens.layout import IndexFolder; "
                               "IndexFolder.claim(sys.argv[1]); print('held', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line(capsys, main(_cli(tiny_model, photos, "--index-dir", out)),
                       f"index {out} is being written by process {holder.pid} since ")
        assert "wait for it to finish" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert f'"pid": {holder.pid}' in (out / layout.LOCK).read_text()  # the dead writer's lock is still on disk ...
    assert main(_cli(tiny_model, photos, "--index-dir", out)) == 0  # ... and is taken over
    assert len(IndexStore.open(out)) == len(folder_fixture.GOOD)


# --------------------------------------------------------------------------- 3. generations


def test_a_failed_reindex_leaves_the_previous_index_as_it_was(photos, tmp_path, tiny_encoder, rng):
    out = tmp_path / "index"
    index_folder(photos, tiny_encoder, out, options=OPTS)
    gen, before = index_files(out), tree(index_files(out))
    for i in range(6):
        Image.fromarray(folder_fixture.noise(rng, 16, 16)).save(photos / f"new{i}.png")
    with pytest.raises(KeyboardInterrupt):
        index_folder(photos, Counting(tiny_encoder, fail_after=4), out, options=OPTS)
    assert index_files(out) == gen and tree(gen) == before  # still current, byte for byte
    assert len(IndexStore.open(out)) == len(folder_fixture.GOOD)
    enc = Counting(tiny_encoder)
    s = index_folder(photos, enc, out, options=OPTS)
    assert s.added == 6 and enc.images == 2  # the first batch of 4 was kept from the failed run
    assert index_files(out) != gen and (out / gen.name).is_dir()  # switched; the previous generation is kept
    assert (out / layout.CURRENT).read_text().strip() == index_files(out).name


def test_serve_answers_from_one_generation_and_picks_up_the_next(photos, tmp_path, tiny_encoder, rng):
    from fastapi.testclient import TestClient

    from cliplens.search import Searcher
    from cliplens.web import create_app

    out = tmp_path / "index"
    index_folder(photos, tiny_encoder, out, options=OPTS)
    searcher = Searcher(encoder=tiny_encoder, store=IndexStore.open(out))
    old_store = searcher.store
    with TestClient(create_app({"p": searcher}), base_url="http://127.0.0.1") as client:
        assert client.get("/api/indexes").json()["indexes"][0]["count"] == len(folder_fixture.GOOD)
        assert client.get("/api/search", params={"q": "dog", "k": 3}).status_code == 200
        Image.fromarray(folder_fixture.noise(rng, 16, 16)).save(photos / "zzz-new.png")
        index_folder(photos, tiny_encoder, out, options=OPTS)
        hits = client.get("/api/search", params={"q": "dog", "k": len(folder_fixture.GOOD) + 1}).json()["hits"]
        assert "zzz-new.png" in {h["ref"] for h in hits}  # the new generation answers
        assert client.get(f"/api/items/{len(folder_fixture.GOOD)}/image").status_code == 200
    assert old_store.embeddings.shape[0] == len(folder_fixture.GOOD)  # the old generation was never modified
    assert np.isfinite(np.asarray(old_store.embeddings)).all()


# --------------------------------------------------------------------------- 4. a full disk


# small_disk (tests/conftest.py): a 256 KiB tmpfs


def test_a_full_disk_is_one_line_and_the_previous_index_stays(small_disk, cifar_root, tiny_model, capsys):
    out = small_disk / "idx"
    base = ["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(out),
            "--model", tiny_model, "--device", "cpu", "-q", "--batch-size", "4"]
    assert main([*base, "--limit", "20"]) == 0  # 20 thumbnails + vectors fit in 256 KiB
    capsys.readouterr()
    gen, before = index_files(out), tree(index_files(out))
    err = one_line(capsys, main([*base, "--rebuild"]), f"not enough disk space in {out}: this index needs about ")  # 200 do not
    assert "MB free" in err and "unchanged" in err
    assert index_files(out) == gen and tree(gen) == before and len(IndexStore.open(out)) == 20
    assert not list(out.rglob("*.partial.npy"))  # the attempt's space is given back


@pytest.mark.parametrize("where", ["vectors", "items"])
def test_an_injected_write_failure_is_one_line_and_damages_nothing(where, cifar_test, tiny_encoder, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "idx"
    index_labeled(cifar_test, tiny_encoder, out, batch_size=50, progress=False, dtype="float16")
    gen, before = index_files(out), tree(index_files(out))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_all" if where == "vectors" else "write_items", full)
    with pytest.raises(StoreSpaceError, match=f"not enough disk space in {out}") as info:
        index_labeled(cifar_test, tiny_encoder, out, batch_size=50, progress=False, rebuild=True)  # float32: new
    assert "\n" not in str(info.value) and info.value.folder == str(out)
    assert index_files(out) == gen and tree(gen) == before
    monkeypatch.undo()
    index_labeled(cifar_test, tiny_encoder, out, batch_size=50, progress=False, rebuild=True)  # space again
    assert IndexStore.open(out).manifest.dtype == "float32"


# --------------------------------------------------------------------------- 6. kill-safety inside finalize


def test_killed_at_the_switch_resumes_without_re_embedding(cifar_test, tiny_encoder, tmp_path, monkeypatch):
    out, fresh = tmp_path / "idx", tmp_path / "fresh"
    real_commit = layout.IndexFolder.commit

    def killed(self, build):
        raise KeyboardInterrupt  # as if SIGKILLed after every file of the build was written

    monkeypatch.setattr(layout.IndexFolder, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        index_labeled(cifar_test, Counting(tiny_encoder), out, batch_size=32, progress=False)
    monkeypatch.setattr(layout.IndexFolder, "commit", real_commit)
    enc = Counting(tiny_encoder)
    _, stats = index_labeled(cifar_test, enc, out, batch_size=32, progress=False)
    assert enc.images == 0 and stats.resumed_from == len(cifar_test)
    index_labeled(cifar_test, tiny_encoder, fresh, batch_size=32, progress=False)
    for name in ("embeddings.npy", "items.parquet", "images.npy"):
        assert (index_files(out) / name).read_bytes() == (index_files(fresh) / name).read_bytes(), name
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".build-*"))


# --------------------------------------------------------------------------- 7. nothing to do costs nothing


def test_an_unchanged_source_is_not_re_embedded_and_loads_no_model(photos, tmp_path, tiny_model, cifar_root,
                                                                   monkeypatch, capsys):
    import cliplens.cli.common as common

    folder_out, cifar_out = tmp_path / "folder", tmp_path / "cifar"
    cifar = ["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(cifar_out),
             "--model", tiny_model, "--device", "cpu", "-q"]  # no --batch-size: the index's own is reused
    assert main(_cli(tiny_model, photos, "--index-dir", folder_out)) == 0
    assert main(cifar) == 0
    capsys.readouterr()
    gens = index_files(folder_out), index_files(cifar_out)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing had changed")

    monkeypatch.setattr(common, "load_model", no_model)
    assert main(_cli(tiny_model, photos, "--index-dir", folder_out)) == 0
    assert main(cifar) == 0
    out = capsys.readouterr().out
    assert f"0 added, 0 updated, 0 removed, 0 reused, 3 skipped: 2 unreadable, 1 too large ({len(folder_fixture.GOOD)} unchanged" in out
    assert "already complete (200 images), nothing to do" in out
    assert (index_files(folder_out), index_files(cifar_out)) == gens
