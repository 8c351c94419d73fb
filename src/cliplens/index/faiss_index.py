"""FAISS backend: any FAISS factory string ("Flat", "HNSW32", "IVF4096,PQ64", ...) over the store's vectors.

Inner product on unit vectors is cosine similarity. The index is saved beside the store::

    INDEX_DIR/faiss/<name>.index         the FAISS index (memory-mapped on open where FAISS allows it)
    INDEX_DIR/faiss/<name>.json          factory, build settings and the store's fingerprint; written last
    INDEX_DIR/faiss/<name>.deleted.npy   bool mask of deleted ids (only after a delete)

FAISS finds the candidates (IDs are the store's row numbers); their scores are then recomputed exactly from the
store's vectors, so scores are true cosines even for compressed (PQ) codes. Filters and deletes run inside FAISS
as an ID selector, so HNSW and IVF skip excluded items while searching instead of dropping them afterwards.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import faiss
import numpy as np

from cliplens._files import atomic_path, write_json_atomic
from cliplens.errors import BackendError
from cliplens.index.backends import check_ids, check_queries, combine_masks, rescore, store_key

log = logging.getLogger(__name__)

DIR = "faiss"
DEFAULT_FACTORY = "HNSW32"
_ADD_ROWS = 65536  # vectors added per call: float16 stores are upcast one chunk at a time (65536 x 512 x 4 B = 128 MB)
_TRAIN_PER_LIST = 39  # FAISS's own minimum of training points per k-means centroid
# Memory-mapping flags to try in turn: flat codes (Flat, HNSW's vectors), then inverted lists (IVF). FAISS
# refuses the combination for IVF indexes, hence two tries before reading the file into memory.
_MMAP_FLAGS = tuple(f for f in (faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0), faiss.IO_FLAG_MMAP) if f)


def index_name(factory: str) -> str:
    """File stem for a factory string: "IVF4096,PQ64" -> "ivf4096_pq64"."""
    return re.sub(r"[^a-z0-9]+", "_", factory.lower()).strip("_") or "index"


def _paths(store, factory: str, name: str | None) -> tuple[Path, Path, Path]:
    base = Path(store.root) / DIR / (name or index_name(factory))
    return base.with_suffix(".index"), base.with_suffix(".json"), base.with_name(base.name + ".deleted.npy")


def _rebuild_hint(store, factory: str) -> str:
    return f"`cliplens build-index --index-dir {store.root} --backend faiss --faiss-index \"{factory}\"`"


class FaissIndex:
    """A FAISS index over one store. Create with :meth:`build` or :meth:`open`."""

    def __init__(self, *, index, store, factory: str, paths: tuple[Path, Path, Path], ef_search: int | None = None,
                 nprobe: int | None = None, k_factor: int = 1):
        self.index = index
        self.store = store
        self.factory = factory
        self.paths = paths
        check_search_knob("efSearch", ef_search)
        check_search_knob("nprobe", nprobe)
        self.ef_search = ef_search
        self.nprobe = nprobe
        if int(k_factor) < 1:
            raise BackendError(f"k_factor must be at least 1, got {k_factor}")
        self.k_factor = int(k_factor)  # search k x k_factor candidates, keep the best k after exact rescoring
        self.deleted = np.load(paths[2]) if paths[2].is_file() else np.zeros(index.ntotal, dtype=bool)
        # which per-query knobs apply: "hnsw", "ivf" or "ivf+hnsw" (an IVF with an HNSW quantizer)
        self._kind = "+".join((["ivf"] if _is_ivf(index) else []) + (["hnsw"] if _find_hnsw(index) is not None else []))

    # ---------------------------------------------------------------- build / open
    @classmethod
    def build(cls, store, *, factory: str = DEFAULT_FACTORY, name: str | None = None, train_size: int | None = None,
              ef_construction: int | None = None, seed: int = 0, progress: bool = True,
              **search_options) -> "FaissIndex":
        """Train (on a seeded sample, where the index needs it), add every vector, save; returns the opened index.

        ``ef_construction`` (HNSW graphs only, the index's own or an IVF's HNSW quantizer): candidates explored per
        insertion, set before any vector is added (FAISS's default is 40); saved in the index and its JSON.
        """
        from tqdm import tqdm

        n, dim = len(store), store.dim
        for knob, key in (("efSearch", "ef_search"), ("nprobe", "nprobe")):  # said now, not after the build
            check_search_knob(knob, search_options.get(key))
        index = _make(factory, dim, n)
        hnsw = _find_hnsw(index)
        if ef_construction is not None:
            if hnsw is None:
                raise BackendError(f"efConstruction applies to HNSW indexes, not {factory!r}: use an HNSW factory "
                                   'string such as "HNSW32", or leave efConstruction out')
            if isinstance(ef_construction, bool) or not isinstance(ef_construction, (int, np.integer)) \
                    or ef_construction < 1:
                raise BackendError(f"efConstruction must be a whole number >= 1, got {ef_construction!r}")
            hnsw.efConstruction = int(ef_construction)
        t0 = time.perf_counter()
        trained_on = 0
        if not index.is_trained:
            for part in (index, faiss.extract_index_ivf(index) if _is_ivf(index) else None):
                part = faiss.downcast_index(part) if part is not None else None
                if hasattr(part, "do_polysemous_training"):  # codes reordered for Hamming filtering, which we never
                    part.do_polysemous_training = False  # use: 20x the PQ training time for nothing
            trained_on = _train(index, store.embeddings, factory, train_size=train_size, seed=seed)
        bar = tqdm(total=n, unit="vec", desc=f"faiss {factory}", disable=not progress, dynamic_ncols=True)
        for lo in range(0, n, _ADD_ROWS):
            block = np.ascontiguousarray(store.embeddings[lo : lo + _ADD_ROWS], dtype=np.float32)
            try:
                index.add(block)
            except RuntimeError as exc:  # e.g. "IDMap,Flat": ids must be the store's row numbers
                raise BackendError(f"FAISS cannot add vectors to {factory!r} ({_faiss_reason(exc)}): "
                                   'use a plain factory string such as "HNSW32"') from None
            bar.update(len(block))
        bar.close()
        seconds = time.perf_counter() - t0
        index_path, meta_path, deleted_path = _paths(store, factory, name)
        meta_path.unlink(missing_ok=True)  # from here until the new JSON lands, the old index no longer opens
        deleted_path.unlink(missing_ok=True)
        with atomic_path(index_path) as tmp:
            faiss.write_index(index, str(tmp))
        write_json_atomic(meta_path, {
            "factory": factory, "metric": "inner_product", "store_key": store_key(store), "count": n, "dim": dim,
            "trained_on": trained_on, "seed": seed, "build_seconds": round(seconds, 3),
            "ef_construction": hnsw.efConstruction if hnsw is not None else None,
            "bytes": index_path.stat().st_size, "faiss_version": faiss.__version__,
        })
        log.info("built FAISS %s over %d vectors in %.1f s -> %s", factory, n, seconds, index_path)
        del index
        return cls.open(store, factory=factory, name=name, **search_options)

    @classmethod
    def open(cls, store, *, factory: str | None = None, name: str | None = None, mmap: bool = True,
             ef_search: int | None = None, nprobe: int | None = None, k_factor: int = 1) -> "FaissIndex":
        """Open a saved index, memory-mapped where FAISS allows; refuse one built for another store.

        ``factory=None``: the one FAISS index built beside the store (several: refused, naming them)."""
        if factory is None and name is None:
            factory = _only_built(store)
        paths = index_path, meta_path, _ = _paths(store, factory or DEFAULT_FACTORY, name)
        if not meta_path.is_file() or not index_path.is_file():
            built = _built_factories(index_path.parent)
            hint = f" (built here: {', '.join(built)}; pick one with --faiss-index)" if built else ""
            raise BackendError(f"no FAISS {factory} index in {index_path.parent}{hint}: build it with "
                               f"{_rebuild_hint(store, factory)}")
        meta = _read_meta(meta_path)
        if meta is None:
            raise BackendError(f"{meta_path} is unreadable: rebuild it with {_rebuild_hint(store, factory)}")
        if meta.get("store_key") != store_key(store):
            hint = _rebuild_hint(store, meta.get("factory", factory))
            raise BackendError(f"the FAISS index {index_path.name} was built for another index than {store.root} "
                               f"(rebuilt or copied since): rebuild it with {hint}")
        index = _read(index_path, mmap=mmap)
        if index.ntotal != len(store) or index.d != store.dim:
            raise BackendError(f"{index_path} holds {index.ntotal} x {index.d} vectors, the store {len(store)} x "
                               f"{store.dim}: rebuild it with {_rebuild_hint(store, meta.get('factory', factory))}")
        return cls(index=index, store=store, factory=meta.get("factory", factory), paths=paths, ef_search=ef_search,
                   nprobe=nprobe, k_factor=k_factor)

    def settings(self) -> dict:
        """What ranks the hits, for ``--json`` and labels (the registry adds the per-query knobs)."""
        return {"index": self.factory}

    def describe(self) -> str:
        """"FAISS HNSW32 (efConstruction 40) (INDEX_DIR/faiss/HNSW32.faiss)": what was built, read from the index."""
        import faiss

        hnsw = getattr(faiss.downcast_index(self.index), "hnsw", None)
        ef = f" (efConstruction {hnsw.efConstruction})" if hnsw is not None else ""
        return f"FAISS {self.factory}{ef} ({self.paths[0]})"

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return int(self.index.ntotal - self.deleted.sum())

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, ef_search: int | None = None,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine; ``ef_search`` (HNSW) and ``nprobe`` (IVF) override the index's settings for this call."""
        q = check_queries(queries, self.index.d)
        n = self.index.ntotal
        mask = combine_masks(allowed, self.deleted, n)
        available = n if mask is None else int(mask.sum())
        k = min(int(k), available)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        check_search_knob("efSearch", ef_search)
        check_search_knob("nprobe", nprobe)
        ef_search = ef_search if ef_search is not None else self.ef_search
        nprobe = nprobe if nprobe is not None else self.nprobe
        if ef_search is not None and "hnsw" not in self._kind:
            raise BackendError(f"efSearch applies to HNSW indexes, not {self.factory!r}")
        if nprobe is not None and "ivf" not in self._kind:
            raise BackendError(f"nprobe applies to IVF indexes, not {self.factory!r}")
        keep = []  # FAISS does not own what the parameter objects point to: keep them alive until the search ends
        sel = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")  # bit i of the bitmap is id i
            sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            keep += [bitmap, sel]
        params = _search_params(self.index, sel, ef_search, nprobe, keep)
        _, candidates = self.index.search(q, min(k * self.k_factor, available), params=params)
        return rescore(q, candidates, self.store.embeddings, k)

    def delete(self, ids) -> int:
        """Exclude items from later searches (saved beside the index); returns how many were still present."""
        ids = check_ids(ids, self.index.ntotal)
        before = int(self.deleted.sum())
        self.deleted = self.deleted.copy()
        self.deleted[ids] = True
        with atomic_path(self.paths[2]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.deleted)
        return int(self.deleted.sum()) - before


# --------------------------------------------------------------------------- helpers


# Limits on the numbers in a factory string, checked before FAISS allocates anything: "IVF1000000000,Flat"
# would allocate a billion inverted lists (tens of GB) before complaining that it cannot be trained.
_MAX_FACTORY_CHARS = 200
_MAX_IVF_LISTS = 1 << 20  # inverted lists (an empty list costs ~48 bytes); billion-vector indexes use 2**16..2**20
_MAX_HNSW_M = 512  # neighbours per node; 32 is usual, 64 large
_MAX_BITS = 16  # "x<bits>": codebook entries per sub-quantizer are 2**bits (IMI2x<bits>: 4**bits lists, max 10)
_MAX_NUMBER = 1 << 16  # any other number (PCA/OPQ output dims, LSH bits, ...): a dim x number matrix
MAX_EF_SEARCH = 1 << 16  # efSearch and nprobe: a search allocates this many candidates per query


def check_factory(factory: str, dim: int, n: int) -> str:
    """The stripped factory string, or BackendError when it is empty, absurd or cannot fit this index."""
    hint = 'use e.g. "Flat", "HNSW32" or "IVF4096,PQ64"'
    if not isinstance(factory, str) or not factory.strip():
        raise BackendError(f"empty FAISS factory string: {hint}")
    factory = factory.strip()
    if len(factory) > _MAX_FACTORY_CHARS or not re.fullmatch(r"[A-Za-z0-9_,.=\-]+", factory):
        raise BackendError(f"bad FAISS factory string {factory[:60]!r} (only letters, digits and , _ . = -): {hint}")
    for kind, number in re.findall(r"(IMI2x|IVF|HNSW|PQ|x|[A-Za-z]*)(\d+)", factory):
        value = int(number)
        limit = {"IVF": _MAX_IVF_LISTS, "HNSW": _MAX_HNSW_M, "PQ": dim, "x": _MAX_BITS, "IMI2x": 10}.get(
            kind, _MAX_NUMBER)
        if value > limit:
            what = {"IVF": f"{value} inverted lists", "HNSW": f"{value} neighbours per node",
                    "PQ": f"{value} sub-quantizers for {dim} dimensions", "x": f"{value}-bit codes",
                    "IMI2x": f"4**{value} inverted lists"}.get(kind, f"the number {value}")
            raise BackendError(f"FAISS factory string {factory!r} asks for {what}, over the limit of {limit}: {hint}")
    return factory


def check_search_knob(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or not 1 <= value <= MAX_EF_SEARCH):
        raise BackendError(f"{name} must be a whole number from 1 to {MAX_EF_SEARCH}, got {value!r}")


def _make(factory: str, dim: int, n: int):
    factory = check_factory(factory, dim, n)
    try:
        return faiss.index_factory(dim, factory.strip(), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = _faiss_reason(exc)
        raise BackendError(f"bad FAISS factory string {factory!r} for {dim}-dimensional vectors ({reason}): "
                           'use e.g. "Flat", "HNSW32" or "IVF4096,PQ64"') from None


def _train(index, embeddings: np.ndarray, factory: str, *, train_size: int | None, seed: int) -> int:
    n = len(embeddings)
    ivf = faiss.extract_index_ivf(index) if _is_ivf(index) else None
    nlist = ivf.nlist if ivf is not None else 1
    if ivf is not None and n < nlist:
        raise BackendError(f"{factory!r} has {nlist} lists but the index holds only {n} vectors: use fewer lists, "
                           f"e.g. IVF{max(1, n // _TRAIN_PER_LIST)} (about {_TRAIN_PER_LIST} vectors per list)")
    size = min(n, train_size or max(_TRAIN_PER_LIST * nlist, 10_000))
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else np.arange(n)
    sample = np.ascontiguousarray(embeddings[rows], dtype=np.float32)
    log.info("training %s on %d of %d vectors", factory, size, n)
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise BackendError(f"FAISS could not train {factory!r} on {size} vectors ({_faiss_reason(exc)}): "
                           "use fewer lists or centroids, or pass a larger train_size") from None
    return size


def _read(path: Path, *, mmap: bool):
    for flags in _MMAP_FLAGS if mmap else ():
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:  # not with these flags for this index type
            continue
    if mmap:
        log.info("%s cannot be memory-mapped; reading it into memory", path.name)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise BackendError(f"cannot read FAISS index {path} ({_faiss_reason(exc)}): rebuild it with "
                           "`cliplens build-index`") from None


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _only_built(store) -> str:
    built = _built_factories(Path(store.root) / DIR)
    if len(built) == 1:
        return built[0]
    if not built:
        raise BackendError(f"no FAISS index in {Path(store.root) / DIR}: build one with "
                           f"{_rebuild_hint(store, DEFAULT_FACTORY)}")
    raise BackendError(f"several FAISS indexes in {Path(store.root) / DIR}: {', '.join(built)}; "
                       "pick one with --faiss-index")


def _built_factories(folder: Path) -> list[str]:
    return [m["factory"] for m in map(_read_meta, sorted(folder.glob("*.json"))) if m and "factory" in m]


def _is_ivf(index) -> bool:
    try:
        return faiss.extract_index_ivf(index) is not None
    except RuntimeError:
        return False


def _find_hnsw(index):
    """The HNSW graph of an HNSW index (or of an IVF index's HNSW quantizer), else None."""
    idx = faiss.downcast_index(index)
    if hasattr(idx, "hnsw"):
        return idx.hnsw
    if _is_ivf(index):
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
        return getattr(quantizer, "hnsw", None)
    return None


def _search_params(index, sel, ef_search, nprobe, keep: list):
    """FAISS per-query parameters for this index's structure (None when defaults and no selector will do).

    Wrapper indexes take their inner index's parameters inside their own type; the ID selector goes to the
    innermost index, which is the one that walks the vectors.
    """
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):  # "PCA64,IVF1024,Flat", "OPQ16,IVF..,PQ16"
        inner = _search_params(idx.index, sel, ef_search, nprobe, keep)
        if inner is None:
            return None
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
    elif isinstance(idx, faiss.IndexRefine):  # "...,RFlat": refine the base index's candidates
        inner = _search_params(idx.base_index, sel, ef_search, nprobe, keep)
        if inner is None:
            return None
        params = faiss.IndexRefineSearchParameters()
        params.base_index_params = inner
        params.k_factor = idx.k_factor
    elif hasattr(idx, "hnsw"):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search) if ef_search is not None else idx.hnsw.efSearch
    elif isinstance(idx, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe) if nprobe is not None else idx.nprobe
        if ef_search is not None:  # an HNSW quantizer ("IVF65536_HNSW32,PQ64")
            quantizer = faiss.SearchParametersHNSW()
            quantizer.efSearch = int(ef_search)
            params.quantizer_params = quantizer
            keep.append(quantizer)
    elif sel is not None:
        params = faiss.SearchParameters()
    else:
        return None
    if sel is not None and not isinstance(idx, (faiss.IndexPreTransform, faiss.IndexRefine)):
        params.sel = sel
    keep.append(params)
    return params


def _faiss_reason(exc: Exception) -> str:
    """The useful line of a FAISS C++ exception ("Error in ... at file:line: <reason>")."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "Error" in line and ":" in line:
            return line.rsplit(": ", 1)[-1].strip()[:160]
    return (text.splitlines() or [type(exc).__name__])[0][:160]
