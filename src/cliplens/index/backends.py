"""Index backends by name: ``exact`` (numpy, the default and oracle), ``faiss`` (in process), ``milvus`` (a database),
``pgvector`` (PostgreSQL + pgvector: a DSN, or an embedded server); each is one line in
:mod:`cliplens.index.registry`.

    build_index(store, "faiss", factory="HNSW32")   # builds and saves beside the store, returns the opened index
    open_index(store, "faiss", factory="HNSW32")    # opens what build_index saved (refused if built for another store)

Every backend answers ``search(queries, k, *, allowed=None)`` like :class:`~cliplens.index.ExactIndex`: cosine
scores sorted descending, ties by the lower id, and ``delete(ids)`` removes items from later results. Approximate
backends only *find* candidates: their scores are recomputed from the store's own vectors (``rescore``), so a hit's
score is the same cosine whichever backend found it, and only recall differs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import numpy as np

from cliplens.errors import BackendError
from cliplens.index.exact import ExactIndex

from cliplens.index.registry import BACKENDS, spec  # noqa: F401  (the names, importable from here as before)


# --------------------------------------------------------------------------- registry


def open_index(store, backend: str = "exact", **options):
    """The named backend over ``store``, as saved by :func:`build_index` (``exact`` needs no build)."""
    return _dispatch(backend, "open")(store, **options)


def build_index(store, backend: str = "exact", **options):
    """Build (or rebuild) the named backend from the store's vectors without re-embedding; returns it opened."""
    return _dispatch(backend, "build")(store, **options)


def _dispatch(backend: str, action: str) -> Callable:
    found = spec(backend)  # the registry (cliplens.index.registry) knows where each backend lives
    if found.module is None:
        return _exact
    return getattr(found.load(), action)


def _exact(store, **options) -> "ExactBackend":
    if options:
        raise BackendError(f"the exact backend takes no options (got {', '.join(sorted(options))})")
    return ExactBackend(store.embeddings)


# --------------------------------------------------------------------------- exact, with deletes


class ExactBackend(ExactIndex):
    """The exact numpy index plus deletes (a mask), so it honours the same contract as the other backends."""

    def __init__(self, embeddings: np.ndarray):
        super().__init__(embeddings)
        self.deleted = np.zeros(len(embeddings), dtype=bool)

    def __len__(self) -> int:
        return int(len(self.embeddings) - self.deleted.sum())

    def delete(self, ids) -> int:
        """Remove items from later results; returns how many were still present."""
        ids = check_ids(ids, len(self.embeddings))
        before = int(self.deleted.sum())
        self.deleted[ids] = True
        return int(self.deleted.sum()) - before

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None):
        mask = combine_masks(allowed, self.deleted, len(self.embeddings))
        return super().search(queries, k, allowed=mask)

    def settings(self) -> dict:
        return {}

    def describe(self) -> str:
        return "exact numpy index (nothing to build)"


# --------------------------------------------------------------------------- shared helpers


def store_key(store) -> str:
    """A fingerprint of one finished store: a backend built for another store (or an older build) is refused."""
    m = store.manifest
    ident = {"identity": m.identity, "created": m.created, "count": m.count, "dim": m.embedding_dim}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be (Q, {dim}) float32, got shape {np.shape(queries)}")
    return q


def check_ids(ids, n: int) -> np.ndarray:
    ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if len(ids) and (ids[0] < 0 or ids[-1] >= n):
        raise BackendError(f"cannot delete ids outside 0..{n - 1} (got {ids[0]}..{ids[-1]})")
    return ids


def check_allowed(allowed: np.ndarray | None, n: int) -> np.ndarray | None:
    if allowed is None:
        return None
    allowed = np.asarray(allowed)
    if allowed.dtype != bool or allowed.shape != (n,):
        raise ValueError(f"allowed must be a bool mask of shape ({n},), got {allowed.dtype} {allowed.shape}")
    return allowed


def combine_masks(allowed: np.ndarray | None, deleted: np.ndarray | None, n: int) -> np.ndarray | None:
    """One bool mask of searchable items (``allowed`` and not ``deleted``), or None when everything is."""
    allowed = check_allowed(allowed, n)
    if deleted is None or not deleted.any():
        return allowed
    return ~deleted if allowed is None else allowed & ~deleted


def rescore(queries: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosines of each query's candidate ids (-1 = none), best ``k`` first, ties by lower id.

    Returns (scores, ids) of shape (Q, k') where k' is the most hits any query has (at most ``k``); shorter rows
    are padded with id -1 and score -inf, as the VectorIndex protocol says.
    """
    q = len(queries)
    out_ids = np.full((q, k), -1, dtype=np.int64)
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    width = 0
    for row in range(q):
        ids = np.unique(candidates[row][candidates[row] >= 0])  # sorted: ties end up by lower id
        if not len(ids):
            continue
        vecs = np.asarray(embeddings[ids], dtype=np.float32)  # fancy indexing reads only these rows of a memmap
        scores = vecs @ queries[row]
        order = np.argsort(-scores, kind="stable")[:k]
        out_ids[row, : len(order)] = ids[order]
        out_scores[row, : len(order)] = scores[order]
        width = max(width, len(order))
    return out_scores[:, :width], out_ids[:, :width]


def score_matrix(index, queries: np.ndarray, n: int, depth: int) -> np.ndarray:
    """(Q, n) float32 scores of every item for each query *as ``index`` ranks them*: its top ``depth`` hits at their
    (cosine) scores, every item it did not return at -inf, i.e. ranked last, as one tie: not retrieved.

    With an exact backend and ``depth >= n`` this is the full similarity matrix, so metrics computed from it are
    the exact ones; with an approximate backend (or a smaller depth) they are what that backend retrieves.
    """
    scores, ids = index.search(queries, int(depth))
    out = np.full((len(ids), n), -np.inf, dtype=np.float32)
    rows, cols = np.nonzero(ids >= 0)
    out[rows, ids[rows, cols]] = scores[rows, cols]
    return out


def label_mask(store, *, labels=None, superclasses=None) -> np.ndarray:
    """bool (N,) mask of items whose label (or superclass) is one of the given ids or names."""
    mask = np.ones(len(store), dtype=bool)
    wanted_by_column = (("label", store.class_names, labels), ("superclass", store.superclass_names, superclasses))
    for column, names, wanted in wanted_by_column:
        if wanted is None:
            continue
        if column not in store.items:
            raise BackendError(f"this index has no {column}s to filter on")
        ids = [_class_id(w, names, column) for w in ([wanted] if isinstance(wanted, (str, int)) else wanted)]
        mask &= np.isin(store.items[column].astype(np.int64), ids)
    return mask


def _class_id(value, names: tuple[str, ...], column: str) -> int:
    if isinstance(value, (int, np.integer)):
        if not 0 <= value < len(names):
            raise BackendError(f"no {column} {value}: {column}s run 0..{len(names) - 1}")
        return int(value)
    key = str(value).strip().lower().replace(" ", "_")
    for i, name in enumerate(names):
        if name.lower() == key:
            return i
    raise BackendError(f"unknown {column} {value!r}: use one of the index's names, e.g. {', '.join(names[:3])}")
