"""The embedding space in 2-D: PCA, t-SNE or UMAP of an index's vectors, cached in the index folder, and a plot.

Libraries (measured by ``bench/bench_map.py`` on 10,000 x 512 clustered unit vectors, docs/study.md): PCA is an
eigendecomposition of the D x D covariance in numpy; t-SNE uses scikit-learn's Barnes-Hut t-SNE (already in the
``eval`` extra, and faster here than openTSNE, which stays available as ``library="opentsne"`` when installed);
UMAP needs umap-learn (the ``map`` extra), the slowest of the three here.
Projections are cached in the index folder as ``projection-<method>-<key>.npy`` (a name only cliplens writes,
written under a temporary name and renamed), keyed by method, library, parameters, seed and the index's identity,
so a rebuilt index never reads a stale map. Points are coloured by superclass, else by class, else by folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np

from cliplens._files import atomic_path
from cliplens.errors import CliplensError

log = logging.getLogger(__name__)

METHODS = ("pca", "tsne", "umap")
LIBRARIES = {"pca": ("numpy",), "tsne": ("sklearn", "opentsne"), "umap": ("umap-learn",)}
PARAMS = {"pca": {}, "tsne": {"perplexity": 30.0}, "umap": {"n_neighbors": 15, "min_dist": 0.1}}
CACHE_PREFIX = "projection-"


class MapError(CliplensError):
    """A projection method or library is unknown or not installed."""


def _need(module: str, extra: str):
    import importlib
    import warnings

    try:
        with warnings.catch_warnings():  # umap-learn warns at import that its optional TensorFlow part is absent
            warnings.simplefilter("ignore", ImportWarning)
            return importlib.import_module(module)
    except ImportError:
        raise MapError(f"this projection needs {extra}: pip install 'cliplens[eval]'") from None


def project(x: np.ndarray, *, method: str = "pca", seed: int = 0, library: str | None = None,
            params: dict | None = None) -> np.ndarray:
    """(N, 2) float32 coordinates of the rows of ``x`` (unit vectors; cosine geometry)."""
    if method not in METHODS:
        raise MapError(f"unknown projection {method!r}; use {', '.join(METHODS)}")
    library = library or LIBRARIES[method][0]
    if library not in LIBRARIES[method]:
        raise MapError(f"{method} runs with {', '.join(LIBRARIES[method])}, not {library!r}")
    p = {**PARAMS[method], **(params or {})}
    x = np.asarray(x, np.float32)
    if len(x) < 3:
        raise MapError(f"a map needs at least 3 items, the index has {len(x)}")
    if method == "pca":
        centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
        _, vecs = np.linalg.eigh(centred.T @ centred)  # D x D covariance: cheaper than an SVD of N x D
        out = centred @ vecs[:, ::-1][:, :2]
        out *= np.sign(out[np.argmax(np.abs(out), axis=0), [0, 1]])  # fix the SVD's sign freedom
        return out.astype(np.float32)
    if method == "tsne":
        perplexity = min(float(p["perplexity"]), (len(x) - 1) / 3.0)
        if library == "opentsne":
            otsne = _need("openTSNE", "openTSNE")
            emb = otsne.TSNE(n_components=2, perplexity=perplexity, metric="cosine", random_state=seed, n_jobs=-1,
                             verbose=False).fit(x)
            return np.asarray(emb, np.float32)
        manifold = _need("sklearn.manifold", "scikit-learn")
        return manifold.TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
                             random_state=seed).fit_transform(x).astype(np.float32)
    umap = _need("umap", "umap-learn")
    import warnings

    with warnings.catch_warnings():  # umap warns that a seed disables its parallelism: that is the point
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=2, n_neighbors=min(int(p["n_neighbors"]), len(x) - 1),
                            min_dist=float(p["min_dist"]), metric="cosine", random_state=seed)
        return np.asarray(reducer.fit_transform(x), np.float32)


def cache_key(manifest, *, method: str, library: str, params: dict, seed: int) -> str:
    fields = {"method": method, "library": library, "params": params, "seed": seed, "count": manifest.count,
              "dim": manifest.embedding_dim, "created": manifest.created, "identity": manifest.identity}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_projection(store, *, method: str = "pca", seed: int = 0, library: str | None = None,
                      params: dict | None = None) -> tuple[np.ndarray, bool]:
    """(points, from_cache): the projection of ``store``'s embeddings, read from or written to its folder."""
    if method not in METHODS:
        raise MapError(f"unknown projection {method!r}; use {', '.join(METHODS)}")
    library = library or LIBRARIES[method][0]
    p = {**PARAMS[method], **(params or {})}
    path = Path(store.root) / f"{CACHE_PREFIX}{method}-{cache_key(store.manifest, method=method, library=library, params=p, seed=seed)}.npy"
    try:
        pts = np.load(path, allow_pickle=False)
        if pts.shape == (len(store), 2):
            return pts.astype(np.float32), True
        log.warning("projection cache %s has shape %s; recomputing", path, pts.shape)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("projection cache %s is unreadable (%s); recomputing", path, exc)
    pts = project(np.asarray(store.embeddings), method=method, seed=seed, library=library, params=p)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, pts)
    except OSError as exc:  # a read-only index folder only costs us the cache
        log.warning("cannot cache the projection in %s (%s)", path, exc)
    return pts, False


def map_groups(store) -> tuple[np.ndarray, tuple[str, ...], str]:
    """(group id per item, group names, what they are): superclass, else class, else the item's folder."""
    from cliplens.prompts import english_classname

    if store.superclasses is not None:
        return store.superclasses, tuple(english_classname(s) for s in store.superclass_names), "superclass"
    if store.has_labels:
        return store.labels, tuple(english_classname(s) for s in store.class_names), "class"
    refs = store.items.get("path", store.items["ref"])
    folders = [str(PurePosixPath(str(r).replace("\\", "/")).parent) for r in refs]
    folders = [f if f not in ("", ".") else "(top folder)" for f in folders]
    names = tuple(sorted(set(folders)))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[f] for f in folders], np.int64), names, "folder"


def centres(points: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(G, 2) median point of each group (nan for an empty one): robust to a few strays."""
    out = np.full((num_groups, 2), np.nan, np.float32)
    for g in range(num_groups):
        sel = points[groups == g]
        if len(sel):
            out[g] = np.median(sel, axis=0)
    return out


def plot_map(points: np.ndarray, groups: np.ndarray, names, title: str) -> bytes:
    """PNG: the points coloured by group, each group's name at its centre."""
    from matplotlib import colormaps

    from cliplens.report_html import _new, _png

    fig = _new(9.0, 8.0)
    ax = fig.add_subplot()
    cmap = colormaps["tab20"]
    size = max(1.0, min(12.0, 4000.0 / max(len(points), 1)))
    ax.scatter(points[:, 0], points[:, 1], c=[cmap(int(g) % 20) for g in groups], s=size, alpha=0.6, linewidths=0)
    for g, (cx, cy) in enumerate(centres(points, groups, len(names))):
        if np.isfinite(cx):
            ax.text(cx, cy, names[g], fontsize=8, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=11)
    return _png(fig)


def map_json(points: np.ndarray, groups: np.ndarray, names, kind: str) -> dict:
    """Coordinates scaled to [0, 1] (4 decimals) for the page's canvas, with groups and their centres."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    scaled = (points - lo) / np.where(hi > lo, hi - lo, 1.0)
    cs = centres(scaled, groups, len(names))
    return {"x": np.round(scaled[:, 0], 4).tolist(), "y": np.round(scaled[:, 1], 4).tolist(),
            "group": groups.astype(int).tolist(), "groups": list(names), "group_kind": kind,
            "centres": [None if not np.isfinite(c[0]) else [round(float(c[0]), 4), round(float(c[1]), 4)] for c in cs]}
