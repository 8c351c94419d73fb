"""Store round trips, resumable writing, incomplete/corrupt detection, and exact search against brute force."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cliplens.errors import ModelMismatchError, QueryError, StoreError
from cliplens.index import ExactIndex
from cliplens.search import Searcher
from cliplens.store import EMBEDDINGS, MANIFEST, PARTIAL, PROGRESS, IndexStore, IndexWriter, index_files


def _unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _identity(n, dtype="float32"):
    return {"model": "m", "weights_sha256": "abc", "source": "s", "count": n, "dtype": dtype, "batch_size": 4}


def _write(root, vecs, dtype="float32", stop_after=None):
    w = IndexWriter(root=root, identity=_identity(len(vecs), dtype), dim=vecs.shape[1])
    done = w.start()
    for start in range(done, len(vecs), 4):
        w.write(start, vecs[start:start + 4])
        w.checkpoint(min(start + 4, len(vecs)))
        if stop_after is not None and start + 4 >= stop_after:
            return w, None
    items = {"id": np.arange(len(vecs)), "ref": [f"r{i}" for i in range(len(vecs))]}
    return w, w.finalize(items=items, manifest={"model": {"name": "m", "weights_sha256": "abc"}})


def test_round_trip_and_memory_map(tmp_path, rng):
    vecs = _unit(rng, 10)
    _, manifest = _write(tmp_path / "idx", vecs)
    store = IndexStore.open(tmp_path / "idx")
    assert isinstance(store.embeddings, np.memmap)
    np.testing.assert_array_equal(store.embeddings, vecs)
    assert manifest.count == 10 and manifest.format_version == 2 and manifest.created
    files = index_files(tmp_path / "idx")
    assert not (files / PROGRESS).exists() and not (files / PARTIAL).exists()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["CURRENT", "cliplens-index.json", "gen-000001",
                                                                     "writer.lock"]  # no scratch left behind
    assert store.item(3)["ref"] == "r3"
    with pytest.raises(StoreError, match="no item 10"):
        store.item(10)


def test_float16_storage(tmp_path, rng):
    vecs = _unit(rng, 9)
    _write(tmp_path / "idx", vecs, dtype="float16")
    store = IndexStore.open(tmp_path / "idx")
    assert store.embeddings.dtype == np.float16
    np.testing.assert_array_equal(store.embeddings, vecs.astype(np.float16))


def test_resume_continues_and_matches_uninterrupted(tmp_path, rng):
    vecs = _unit(rng, 18)
    _write(tmp_path / "whole", vecs)
    w, _ = _write(tmp_path / "cut", vecs, stop_after=8)
    del w
    with pytest.raises(StoreError, match=r"incomplete \(8 of 18 images embedded\).*run the same"):
        IndexStore.open(tmp_path / "cut")
    resumed = IndexWriter(root=tmp_path / "cut", identity=_identity(18), dim=8)
    assert resumed.start() == 8
    _write(tmp_path / "cut", vecs)
    a = (index_files(tmp_path / "whole") / EMBEDDINGS).read_bytes()
    b = (index_files(tmp_path / "cut") / EMBEDDINGS).read_bytes()
    assert a == b


def test_changed_settings_restart_from_scratch(tmp_path, rng):
    vecs = _unit(rng, 12)
    _write(tmp_path / "idx", vecs, stop_after=4)
    other = IndexWriter(root=tmp_path / "idx", identity=_identity(12, "float16"), dim=8)
    assert other.start() == 0


def test_corrupt_and_foreign_folders(tmp_path, rng):
    with pytest.raises(StoreError, match="no index at"):
        IndexStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a cliplens index"):
        IndexStore.open(tmp_path / "empty")
    vecs = _unit(rng, 8)
    _write(tmp_path / "idx", vecs)
    files = index_files(tmp_path / "idx")
    m = json.loads((files / MANIFEST).read_text())
    m["count"] = 9
    (files / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="corrupt"):
        IndexStore.open(tmp_path / "idx")
    (files / EMBEDDINGS).write_bytes(b"not numpy")
    with pytest.raises(StoreError, match="corrupt"):
        IndexStore.open(tmp_path / "idx")


def test_exact_index_matches_brute_force_with_ties(rng):
    emb = _unit(rng, 200, 16)
    emb[50] = emb[10]  # exact duplicates: ties must go to the lower id
    emb[120] = emb[10]
    index = ExactIndex(emb)
    q = emb[[10, 3]]
    scores, ids = index.search(q, 7)
    for row in range(2):
        s = emb @ q[row]
        ref = sorted(range(200), key=lambda i: (-s[i], i))[:7]
        assert ids[row].tolist() == ref
        np.testing.assert_allclose(scores[row], s[ref], rtol=0, atol=1e-6)
    assert ids[0][:3].tolist() == [10, 50, 120]
    mask = np.zeros(200, bool)
    mask[[5, 6]] = True
    s_, i_ = index.search(q[:1], 7, allowed=mask)
    assert sorted(i_[0].tolist()) == [5, 6]


def test_float16_index_scores_in_chunks(monkeypatch, rng):
    import cliplens.index.exact as exact

    monkeypatch.setattr(exact, "_CHUNK_ROWS", 7)
    emb = _unit(rng, 50).astype(np.float16)
    q = _unit(rng, 1)
    np.testing.assert_allclose(exact.ExactIndex(emb).scores(q)[0], emb.astype(np.float32) @ q[0], atol=1e-6)


def test_searcher_on_real_index(tiny_index, tiny_encoder):
    store = IndexStore.open(tiny_index)
    searcher = Searcher(encoder=tiny_encoder, store=store)
    result = searcher.search("tractor", 10)
    assert result.prompt == "a photo of a tractor."
    q = tiny_encoder.encode_texts(["a photo of a tractor."])[0]
    s = np.asarray(store.embeddings) @ q
    ref = sorted(range(len(s)), key=lambda i: (-s[i], i))[:10]
    assert [h.id for h in result.hits] == ref
    labels = store.labels
    tractor = store.class_names.index("tractor")
    assert result.query_class == "tractor"
    assert result.precision_at_k == pytest.approx(np.mean(labels[ref] == tractor))
    assert [h.match for h in result.hits] == [bool(labels[i] == tractor) for i in ref]
    assert searcher.search("tractor", 3, raw=True).prompt == "tractor"
    assert searcher.search("a red tractor in snow", 3).query_class is None
    for bad in (0, len(store) + 1):
        with pytest.raises(QueryError, match="k must be between 1"):
            searcher.search("tractor", bad)
    with pytest.raises(QueryError, match="empty query"):
        searcher.search("   ", 5)


def test_searcher_refuses_another_model(tiny_index, tiny_encoder, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(tiny_index, copy)
    m = json.loads((index_files(copy) / MANIFEST).read_text())
    m["model"]["weights_sha256"] = "0" * 64
    (index_files(copy) / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ModelMismatchError, match="was built with .* not "):
        Searcher(encoder=tiny_encoder, store=IndexStore.open(copy))
