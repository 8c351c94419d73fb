"""The one place that knows each index backend: its name, the extra that installs it, where its class lives, the
options it takes when searching and when building (and the command-line flag each comes from), and how its
settings are shown. ``cliplens.index.backends`` opens and builds through it; ``cliplens.cli`` asks it for flags,
options, labels and descriptions instead of switching on names.

A new backend is one module with a class that has ``open(store, **options)``, ``build(store, **options)``,
``search``/``delete`` (the contract in :mod:`cliplens.index.backends`) and ``settings()``, plus one
:class:`BackendSpec` line in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from cliplens.errors import BackendError


@dataclass(frozen=True)
class Option:
    """One backend option: the keyword the backend takes, the flag it comes from (its ``args`` attribute is the
    flag's name without dashes), and the word used when it is shown ("efSearch 64")."""

    keyword: str
    flag: str
    shown: str | None = None  # None: not part of the label

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    summary: str
    module: str | None = None  # None: built in (exact)
    cls: str | None = None
    extra: str | None = None  # pip install 'cliplens[EXTRA]'
    search: tuple[Option, ...] = ()
    build: tuple[Option, ...] = ()  # taken when building, besides the search options
    build_defaults: Mapping[str, Any] = field(default_factory=dict)
    label: Callable[[dict, str], str] | None = None  # (settings, knobs) -> "faiss HNSW32 (efSearch 64)"
    usage: str = ""  # how to pick it on the command line for a build option, e.g. "--backend faiss --faiss-index HNSW32"
    not_hnsw: Callable[[Mapping[str, Any]], str | None] | None = None  # flags -> "not 'Flat': use ..." or None

    @property
    def exact(self) -> bool:
        return self.module is None

    def load(self) -> type:
        """The backend's class, imported on first use; BackendError naming the extra when it is missing."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise BackendError(f"the {self.name} backend needs {exc.name or self.extra}: "
                               f"pip install 'cliplens[{self.extra}]'") from None
        return getattr(module, self.cls)

    def options(self, values: Mapping[str, Any], *, build: bool = False, progress: bool = True) -> dict:
        """The options this backend takes, read from ``values`` (flag dest -> value, e.g. ``vars(args)``); unset
        ones are left out so the backend's own defaults apply."""
        opts = {o.keyword: values.get(o.dest) for o in self.search}
        if build:
            opts.update({o.keyword: values.get(o.dest) for o in self.build})
            for k, v in self.build_defaults.items():
                opts[k] = v if opts.get(k) is None else opts[k]
            if self.module is not None:
                opts["progress"] = progress
        return {k: v for k, v in opts.items() if v is not None}

    def knobs(self, values: Mapping[str, Any]) -> dict:
        """The per-query settings that were given (shown beside the hits): {"ef_search": 64}."""
        return {o.keyword: values.get(o.dest) for o in self.search if o.shown and values.get(o.dest)}

    def describe_knobs(self, values: Mapping[str, Any]) -> str:
        words = {o.keyword: o.shown for o in self.search if o.shown}
        return ", ".join(f"{words[k]} {v}" for k, v in self.knobs(values).items())


_EF_SEARCH = Option("ef_search", "--ef-search", "efSearch")

REGISTRY: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("exact", "numpy, every vector scored (the default and the oracle)"),
    BackendSpec("faiss", "FAISS in this process (Flat, HNSW, IVF, PQ)", "cliplens.index.faiss_index", "FaissIndex",
                "faiss", search=(Option("factory", "--faiss-index"), _EF_SEARCH, Option("nprobe", "--nprobe", "nprobe")),
                build=(Option("train_size", "--train-size"), Option("ef_construction", "--ef-construction")),
                build_defaults={"factory": "HNSW32"},
                label=lambda s, knobs: f"faiss {s['index']}" + (f" ({knobs})" if knobs else ""),
                usage="--backend faiss --faiss-index HNSW32",
                not_hnsw=lambda v: None if "HNSW" in (v.get("faiss_index") or "HNSW32").upper() else
                f"""not {v.get('faiss_index')!r}: use an HNSW factory string such as "HNSW32", or drop --ef-construction"""),
    BackendSpec("milvus", "a Milvus collection (Milvus Lite in the index folder, or a server)",
                "cliplens.index.milvus_index", "MilvusIndex", "milvus",
                search=(Option("uri", "--milvus-uri"), Option("collection", "--milvus-collection")),
                label=lambda s, knobs: f"milvus {s['collection']}"),
    BackendSpec("pgvector", "a PostgreSQL table with pgvector (a DSN, or an embedded server)",
                "cliplens.index.pgvector_index", "PgvectorIndex", "pgvector",
                search=(Option("uri", "--pg-uri"), Option("table", "--pg-table"), _EF_SEARCH,
                        Option("probes", "--nprobe", "probes"), Option("scan", "--pg-scan")),
                build=(Option("index", "--pg-index"), Option("m", "--pg-m"), Option("lists", "--pg-lists"),
                       Option("ef_construction", "--ef-construction")),
                label=lambda s, knobs: f"pgvector {s['table']} ({s['index']}{', ' + knobs if knobs else ''})",
                usage="--backend pgvector",
                not_hnsw=lambda v: None if (v.get("pg_index") or "hnsw") == "hnsw" else
                f"not --pg-index {v.get('pg_index')}: use --pg-index hnsw, or drop --ef-construction"),
)}
BACKENDS = tuple(REGISTRY)


def spec(name: str | None) -> BackendSpec:
    """The backend called ``name`` (None: exact); BackendError listing the known ones."""
    key = (name or "exact").strip().lower()
    if key not in REGISTRY:
        raise BackendError(f"unknown index backend {name!r}: use one of {', '.join(BACKENDS)}")
    return REGISTRY[key]


def owners(dest: str, *, build: bool) -> list[str]:
    """The backends that take the option read from flag attribute ``dest`` (when searching, or also building)."""
    return [s.name for s in REGISTRY.values()
            if any(o.dest == dest for o in (*s.search, *(s.build if build else ())))]
