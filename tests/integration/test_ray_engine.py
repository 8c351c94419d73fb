"""``--engine ray`` on a local Ray with 2 CPUs, the fixture's CIFAR-format data and the tiny random model.

The store a Ray run writes must equal the local run's (same vectors, bit for bit; same items and manifest apart
from timestamps and speed); a shard that raises once is retried; a run that fails keeps its finished shards and
the next run redoes only the others. An image folder indexed with ``--engine ray`` equals a local run too, first
run and incremental run alike (added, updated, removed, reused; the undecodable file skipped on the worker).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import folder_fixture
import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from cliplens.distributed import SHARDS, RayEngine, RayOptions, connect_ray  # noqa: E402
from cliplens.embed import ArraySource  # noqa: E402
from cliplens.errors import EngineError  # noqa: E402
from cliplens.store import ITEMS, IndexStore, IndexWriter, index_files, read_items  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray Data's own DataContext() warns on creation
]

SHARD_BATCHES = 2  # 2 x batch 32 = 64 rows a shard: 4 shards for the fixture's 200 images


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray (2 CPUs) for the module: started the way the engine starts it, shut down at the end."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    started = connect_ray(RayOptions(num_cpus=2))
    yield
    if started:
        ray.shutdown()


class FlakySource(ArraySource):
    """Images whose loading fails for rows [fail_from, ...) while ``switch`` exists, or only the first time."""

    def __init__(self, images, *, fail_from: int, switch: Path, once: bool):
        super().__init__(images)
        self.fail_from, self.switch, self.once = fail_from, str(switch), once

    def load(self, start, stop):
        if start <= self.fail_from < stop and os.path.exists(self.switch):
            if self.once:
                os.remove(self.switch)  # whoever removes it fails; every later attempt succeeds
            raise OSError(f"simulated read error at row {self.fail_from}")
        return super().load(start, stop)


def _embed(source, encoder, root: Path, *, identity_of: IndexStore) -> tuple[RayEngine, np.ndarray | None]:
    """Run the engine into a writer with the reference store's identity; return the embeddings written."""
    engine = RayEngine(RayOptions(shard_batches=SHARD_BATCHES))
    writer = IndexWriter(root=root, identity=identity_of.manifest.identity, dim=identity_of.dim)
    stats = engine.embed_into(source, encoder, writer, batch_size=32, progress=False)
    assert stats.count == len(source) - stats.resumed_from
    items = {k: v for k, v in identity_of.items.items()}
    writer.finalize(items=items, manifest={"model": identity_of.manifest.model})
    return engine, np.asarray(IndexStore.open(root).embeddings)


def test_cli_engine_ray_store_equals_local(tiny_index, tiny_model, cifar_root, tmp_path, capsys):
    from cliplens.cli import main

    out = tmp_path / "ray-index"
    code = main(["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(out),
                 "--model", tiny_model, "--device", "cpu", "--batch-size", "32", "-q", "--engine", "ray"])
    assert code == 0, capsys.readouterr().err
    assert "indexed 200 images" in capsys.readouterr().out
    local, remote = IndexStore.open(tiny_index), IndexStore.open(out)
    assert np.array_equal(np.asarray(remote.embeddings), np.asarray(local.embeddings))  # identical, not close
    a, b = read_items(index_files(tiny_index) / ITEMS), read_items(index_files(out) / ITEMS)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(remote.images(), local.images())
    volatile = {"created", "stats"}
    assert {k: v for k, v in remote.manifest.to_json().items() if k not in volatile} == \
           {k: v for k, v in local.manifest.to_json().items() if k not in volatile}
    assert not list(out.rglob(SHARDS)) and not list(out.glob(".build-*"))  # merged and cleaned up


def test_shard_that_raises_once_is_retried(tiny_index, tiny_encoder, cifar_test, tmp_path):
    switch = tmp_path / "fail-once"
    switch.touch()
    source = FlakySource(cifar_test.images, fail_from=130, switch=switch, once=True)  # inside shard 2 (128..192)
    engine, vectors = _embed(source, tiny_encoder, tmp_path / "idx", identity_of=IndexStore.open(tiny_index))
    assert not switch.exists()  # the failure happened ...
    assert np.array_equal(vectors, np.asarray(IndexStore.open(tiny_index).embeddings))  # ... and was retried
    assert engine.last_run.shards == engine.last_run.shards_computed == 4 and engine.last_run.actors == 2


def test_failed_run_keeps_finished_shards_and_resumes(tiny_index, tiny_encoder, cifar_test, tmp_path):
    reference = IndexStore.open(tiny_index)
    switch = tmp_path / "broken"
    switch.touch()
    source = FlakySource(cifar_test.images, fail_from=195, switch=switch, once=False)  # the last shard, always
    with pytest.raises(EngineError, match="finished shards are kept") as info:
        _embed(source, tiny_encoder, tmp_path / "idx", identity_of=reference)
    assert "\n" not in str(info.value)
    assert "(OSError: simulated read error at row 195)" in str(info.value)  # the worker's reason, not Ray's advice
    kept = sorted(p.name for p in (tmp_path / "idx").glob(f".build-*/{SHARDS}/shard-*.npy"))  # the build's scratch
    assert kept and "shard-000003.npy" not in kept  # shards 0..2 finish before the last one fails
    with pytest.raises(Exception):
        IndexStore.open(tmp_path / "idx")  # incomplete: never searchable
    switch.unlink()  # the cause is fixed: the same job again
    engine, vectors = _embed(source, tiny_encoder, tmp_path / "idx", identity_of=reference)
    assert engine.last_run.shards_reused == len(kept) and engine.last_run.shards_computed == 4 - len(kept)
    assert np.array_equal(vectors, np.asarray(reference.embeddings))



def _folder_run(argv, capsys) -> str:
    from cliplens.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    line = out.strip()
    return line.split(": ", 1)[1].split(" images in ")[0]  # the counts, without the index folder's path


def _same_folder_index(ray_dir: Path, local_dir: Path) -> None:
    ray_store, local_store = IndexStore.open(ray_dir), IndexStore.open(local_dir)
    for column in ("id", "path", "ref", "sha256", "size", "mtime_ns", "caption"):
        assert list(ray_store.items[column]) == list(local_store.items[column]), column
    np.testing.assert_allclose(np.asarray(ray_store.embeddings), np.asarray(local_store.embeddings), rtol=0, atol=1e-6)
    assert ray_store.manifest.folder["skipped"] == local_store.manifest.folder["skipped"]


def test_cli_folder_engine_ray_equals_local_and_stays_incremental(tiny_model, tmp_path, capsys, monkeypatch):
    runs = []
    embed_into = RayEngine.embed_into

    def spy(self, *args, **kwargs):  # proves the folder's new images went through Ray, and how many shards
        stats = embed_into(self, *args, **kwargs)
        runs.append((len(args[0]), self.last_run))
        return stats

    monkeypatch.setattr(RayEngine, "embed_into", spy)
    photos = folder_fixture.make_folder(tmp_path / "photos")
    common = ["--model", tiny_model, "--device", "cpu", "--batch-size", "4", "-q"]
    local, remote = tmp_path / "local", tmp_path / "ray"

    def both() -> tuple[str, str]:
        return (_folder_run(["index", str(photos), "--index-dir", str(local), *common], capsys),
                _folder_run(["index", str(photos), "--index-dir", str(remote), *common, "--engine", "ray"], capsys))

    first_local, first_ray = both()
    good = len(folder_fixture.GOOD)
    assert first_ray == first_local == f"{good} added, 0 updated, 0 removed, 0 reused, 3 skipped: 2 unreadable, 1 too large (0 unchanged; {good}"
    _same_folder_index(remote, local)
    skipped = {s["path"] for s in IndexStore.open(remote).manifest.folder["skipped"]}
    assert "truncated.png" in skipped  # its decoding failed on a Ray worker, and the driver heard of it
    assert runs[-1][0] == good + 1 and runs[-1][1].shards_computed == 1  # 10 decodable headers, one shard of 16 x 4

    rng = np.random.default_rng(1)
    os.rename(photos / "sub/b.jpg", photos / "moved-b.jpg")  # reused by content hash
    st = (photos / "e.bmp").stat()
    Image.fromarray(folder_fixture.noise(rng, 20, 30)).save(photos / "e.bmp")  # updated
    os.utime(photos / "e.bmp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (photos / "f.tiff").unlink()  # removed
    Image.fromarray(folder_fixture.noise(rng, 24, 24)).save(photos / "new.png")  # added
    second_local, second_ray = both()
    want = f"1 added, 1 updated, 1 removed, 1 reused, 3 skipped: 2 unreadable, 1 too large ({good - 3} unchanged; {good}"
    assert second_ray == second_local == want
    _same_folder_index(remote, local)
    assert runs[-1][0] == 2  # only new.png and the changed e.bmp were embedded, on Ray
    assert not list(remote.glob(".build-*"))  # the pending vectors went with the build they were for


def test_folder_missing_on_a_worker_fails_with_one_line(tiny_encoder, tmp_path):
    """A worker that cannot see the folder (a cluster node without the shared filesystem) says so, in one line."""
    from cliplens.sources.folder import FolderSource

    missing = tmp_path / "only-on-the-driver"
    source = FolderSource(missing, ["a.png", "b.png"], max_pixels=10**8)
    writer = IndexWriter(root=tmp_path / "pending", identity={"source": "folder-pending", "count": 2,
                                                              "dtype": "float32"}, dim=tiny_encoder.info.embed_dim)
    with pytest.raises(EngineError, match=f"the image folder {missing} is not readable on") as info:
        RayEngine(RayOptions(max_retries=0)).embed_into(source, tiny_encoder, writer, batch_size=2, progress=False)
    assert "\n" not in str(info.value) and "same path" in str(info.value)
