"""The 2-D map: PCA recovers a known plane, t-SNE/UMAP keep clusters apart, the cache is keyed and never stale."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
from test_evaluate import build_store

from cliplens.embedmap import MapError, cache_key, cached_projection, centres, map_groups, map_json, plot_map, project


def clusters(rng, per: int = 20, k: int = 3, dim: int = 16):
    labels = np.repeat(np.arange(k), per)
    x = 4 * np.eye(dim)[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_pca_recovers_the_two_directions_of_largest_variance(rng):
    a, b = rng.normal(size=200) * 3, rng.normal(size=200)
    a, b = a - a.mean(), b - b.mean()
    b -= a * (a @ b) / (a @ a)  # exactly uncorrelated in the sample, so the sample's principal axes are e5 and e2
    x = np.zeros((200, 8), np.float32)
    x[:, 5], x[:, 2] = a, b  # the largest variance lies along e5, the second along e2
    pts = project(x, method="pca")
    assert pts.shape == (200, 2) and pts.dtype == np.float32
    np.testing.assert_allclose(np.abs(pts[:, 0]), np.abs(a - a.mean()), atol=0.05)
    np.testing.assert_allclose(np.abs(pts[:, 1]), np.abs(b - b.mean()), atol=0.05)
    np.testing.assert_array_equal(project(x, method="pca"), pts)  # deterministic, sign included


@pytest.mark.parametrize("method,library", [("tsne", "sklearn"), ("tsne", "opentsne"), ("umap", "umap-learn")])
def test_nonlinear_maps_keep_clusters_apart(rng, method, library):
    module = {"sklearn": "sklearn", "opentsne": "openTSNE", "umap-learn": "umap"}[library]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{library} is not installed (optional: pip install {library})")
    x, labels = clusters(rng)
    pts = project(x, method=method, library=library, seed=0)
    c = centres(pts, labels, 3)
    within = max(np.linalg.norm(pts[labels == g] - c[g], axis=1).mean() for g in range(3))
    between = min(np.linalg.norm(c[i] - c[j]) for i in range(3) for j in range(i + 1, 3))
    assert between > 2 * within


def test_bad_method_library_or_size():
    with pytest.raises(MapError, match="unknown projection"):
        project(np.eye(4), method="mds")
    with pytest.raises(MapError, match="tsne runs with"):
        project(np.eye(4), method="tsne", library="numpy")
    with pytest.raises(MapError, match="at least 3 items"):
        project(np.eye(2), method="pca")


def test_cache_in_the_index_folder_keyed_by_method_and_params(tmp_path):
    store = build_store(tmp_path / "index")
    pts, cached = cached_projection(store, method="pca")
    assert not cached and pts.shape == (18, 2)
    again, cached = cached_projection(store, method="pca")
    assert cached and np.array_equal(again, pts)
    files = sorted(p.name for p in (tmp_path / "index").glob("projection-*"))
    assert len(files) == 1 and files[0].startswith("projection-pca-") and not list((tmp_path / "index").glob(".*tmp"))
    m = store.manifest
    keys = {cache_key(m, method="tsne", library="sklearn", params={"perplexity": p}, seed=s) for p in (5, 30) for s in (0, 1)}
    assert len(keys) == 4
    rebuilt = dataclasses.replace(m, created="another time")
    assert cache_key(rebuilt, method="pca", library="numpy", params={}, seed=0) != \
        cache_key(m, method="pca", library="numpy", params={}, seed=0)
    (tmp_path / "index" / files[0]).write_bytes(b"not an npy file")  # a damaged cache is recomputed, not trusted
    fresh, cached = cached_projection(store, method="pca")
    assert not cached and np.array_equal(fresh, pts)


def test_groups_superclass_then_class_then_folder(tmp_path):
    store = build_store(tmp_path / "a")
    g, names, kind = map_groups(store)
    assert kind == "superclass" and names == ("fruit and vegetables", "aquatic mammals", "vehicles")
    assert g.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    g, names, kind = map_groups(build_store(tmp_path / "b", superclasses=False))
    assert kind == "class" and names[1] == "sweet pepper"

    class Folder:
        has_labels, superclasses = False, None
        items = {"ref": np.array(["a.png", "x/b.png", "x/y/c.png", "x/d.png"], object)}

    g, names, kind = map_groups(Folder())
    assert kind == "folder" and names == ("(top folder)", "x", "x/y") and g.tolist() == [0, 1, 2, 1]


def test_plot_and_json(rng):
    x, labels = clusters(rng)
    pts = project(x, method="pca")
    assert plot_map(pts, labels, ("a", "b", "c"), "t")[:4] == b"\x89PNG"
    j = map_json(pts, labels, ("a", "b", "c"), "class")
    assert min(j["x"]) == 0.0 and max(j["x"]) == 1.0 and len(j["group"]) == 60 and len(j["centres"]) == 3
