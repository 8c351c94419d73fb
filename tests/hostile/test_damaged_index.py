"""A damaged index is named, not trusted: each case damages a copy of a good index one way; opening it (search,
info) must fail with one line naming the file and how to rebuild, never a traceback, never results.

A new case is one line in CASES: (id, damage function, text the message must contain).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from cliplens import store as store_module
from cliplens.cli import main
from cliplens.store import IndexStore, index_files, read_items, write_items


def _manifest(gen):
    return json.loads((gen / "manifest.json").read_text())


def _set_manifest(gen, **changes):
    m = _manifest(gen)
    m.update(changes)
    (gen / "manifest.json").write_text(json.dumps(m))


def _rewrite_items(gen, change, *, fix_digest=True):
    items = read_items(gen / "items.parquet")
    change(items)
    write_items(gen / "items.parquet", {k: list(v) if v.dtype == object else v for k, v in items.items()})
    if fix_digest:  # a tamperer who also updates the manifest: the other checks must still catch it
        m = _manifest(gen)
        m["files"]["items.parquet"]["sha256"] = hashlib.sha256((gen / "items.parquet").read_bytes()).hexdigest()
        (gen / "manifest.json").write_text(json.dumps(m))


def _emb(gen, fn):
    arr = np.load(gen / "embeddings.npy")
    np.save(gen / "embeddings.npy", fn(arr))


def _nan(a):
    a = a.copy()
    a[7, 3] = np.nan
    return a


def _drop_id(items):
    del items["id"]


def _bad_label(items):
    items["label"] = items["label"].copy()
    items["label"][3] = 100


def _shuffle_ids(items):
    items["id"] = items["id"][::-1].copy()


def _other_items(gen, other_gen):
    shutil.copy(other_gen / "items.parquet", gen / "items.parquet")


CASES = [
    ("manifest-not-json", lambda g, o: (g / "manifest.json").write_text("{nope"), "manifest.json"),
    ("manifest-count-type", lambda g, o: _set_manifest(g, count="ten"), "count is str"),
    ("manifest-format-99", lambda g, o: _set_manifest(g, format_version=99), "has format 99"),
    ("manifest-no-digest", lambda g, o: _set_manifest(g, files={}), "records no digest of items.parquet"),
    ("manifest-class-names", lambda g, o: _set_manifest(g, class_names=[1, 2]), "class_names holds non-strings"),
    ("manifest-f2c", lambda g, o: _set_manifest(g, fine_to_coarse=[0] * 3), "fine_to_coarse map"),
    ("vectors-float64", lambda g, o: _emb(g, lambda a: a.astype(np.float64)), "embeddings.npy is float64"),
    ("vectors-short", lambda g, o: _emb(g, lambda a: a[:-1]), "embeddings.npy is float32(199"),
    ("vectors-nan", lambda g, o: _emb(g, _nan), "embeddings.npy holds NaN"),
    ("vectors-garbage", lambda g, o: (g / "embeddings.npy").write_bytes(b"\x93NUMPY garbage"), "embeddings.npy"),
    ("items-of-another-index", _other_items, "items.parquet is not the one this index was built with"),
    ("items-rows", lambda g, o: _rewrite_items(g, lambda it: [it.__setitem__(k, v[:-1]) for k, v in list(it.items())]),
     "items.parquet has 199 rows, expected 200"),
    ("items-no-id", lambda g, o: _rewrite_items(g, _drop_id), "items.parquet has no 'id' column"),
    ("items-label-range", lambda g, o: _rewrite_items(g, _bad_label), "label values outside 0..99"),
    ("items-ids-order", lambda g, o: _rewrite_items(g, _shuffle_ids), "ids that are not 0..199 in order"),
    ("thumbnails-shape", lambda g, o: np.save(g / "images.npy", np.zeros((3, 4, 4, 3), np.uint8)), "images.npy is"),
    ("current-escapes", lambda g, o: (g.parent / "CURRENT").write_text("../../etc\n"), "not a generation folder"),
    ("current-missing-gen", lambda g, o: (g.parent / "CURRENT").write_text("gen-000099\n"), "not a generation"),
]


@pytest.fixture(scope="module")
def other_index(tmp_path_factory, cifar_root, tiny_encoder):
    """Another index (of the train split) to take files from."""
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled

    out = tmp_path_factory.mktemp("other") / "idx"
    train = load_cifar("cifar100", "train", data_dir=cifar_root, verify=False, progress=False, limit=200)
    index_labeled(train, tiny_encoder, out, batch_size=64, progress=False, store_images=False)
    return out


@pytest.mark.parametrize("damage,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_damaged_index_is_refused_in_one_line(damage, needle, tiny_index, other_index, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_index, bad)
    damage(index_files(bad), index_files(other_index))
    for argv in (["search", "apple", "--index-dir", str(bad)], ["info", "--index-dir", str(bad)]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cliplens: error:") and "Traceback" not in err, err
        assert needle in lines[0], lines[0]
        assert "rebuild" in lines[0] and out == ""


def test_info_check_reads_every_vector_opening_reads_a_sample(tiny_index, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_index, bad)
    monkeypatch.setattr(store_module, "FINITE_SAMPLE", 5)  # rows 0, 49, 99, 149, 199 are sampled
    _emb(index_files(bad), _nan)  # row 7: outside the sample
    assert len(IndexStore.open(bad)) == 200
    assert main(["info", "--index-dir", str(bad)]) == 0
    capsys.readouterr()
    assert main(["info", "--index-dir", str(bad), "--check"]) == 2
    assert "embeddings.npy holds NaN or infinite values" in capsys.readouterr().err
    assert main(["info", "--index-dir", str(tiny_index), "--check"]) == 0
    assert "every vector finite" in capsys.readouterr().out


def test_a_format_1_index_opens_and_is_upgraded_by_the_next_index_run(tiny_index, cifar_test, tiny_encoder,
                                                                      tmp_path, capsys):
    from cliplens.embed import index_labeled

    old = tmp_path / "format1"  # the layout cliplens wrote before generations: the files at the top, no CURRENT
    shutil.copytree(index_files(tiny_index), old)
    m = _manifest(old)
    m["format_version"] = 1
    del m["files"]
    (old / "manifest.json").write_text(json.dumps(m))
    store = IndexStore.open(old)
    assert store.generation == "" and len(store) == 200
    np.testing.assert_array_equal(store.embeddings, IndexStore.open(tiny_index).embeddings)
    assert main(["search", "apple", "--index-dir", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"]
    _, stats = index_labeled(cifar_test, tiny_encoder, old, batch_size=32, progress=False)
    assert stats.count == 0  # the same identity: nothing to re-embed, and nothing rewritten
    index_labeled(cifar_test, tiny_encoder, old, batch_size=64, progress=False, dtype="float16", rebuild=True)
    assert (old / "CURRENT").is_file() and not (old / "manifest.json").exists()  # upgraded in place
    assert IndexStore.open(old).manifest.format_version == 2
