"""Scale-out subcommand and flags: ``build-index`` (a FAISS index, a Milvus collection or a pgvector table from an
existing store),
``--backend`` for the commands that search (``search``, ``evaluate``, ``serve``), build settings
(``--ef-construction``, ``--train-size``) for the commands that build one (``build-index``, ``index``), and
``--engine ray`` for ``index`` (CIFAR and image folders).

Other commands wire the backend in with two lines::

    add_backend_flags(parser)                       # when registering the command
    index = open_backend(store, args)               # then Searcher(encoder=..., store=store, index=index)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cliplens.cli.common import positive_int
from cliplens.index.registry import REGISTRY, owners, spec


# --------------------------------------------------------------------------- flags


def add_backend_flags(p: argparse.ArgumentParser, *, default: str | None = "exact", required: bool = False) -> None:
    g = p.add_argument_group("index backend")
    g.add_argument("--backend", default=default, required=required, metavar="NAME",
                   help="vector index: " + "; ".join(f"{s.name}: {s.summary}" for s in REGISTRY.values())
                        + f" (default {default or 'none'})")
    g.add_argument("--faiss-index", default=None, metavar="FACTORY",
                   help='FAISS factory string, e.g. Flat, HNSW32, "IVF4096,PQ64" (building: default HNSW32; '
                        "searching: default the one FAISS index built for this folder)")
    g.add_argument("--ef-search", type=positive_int, default=None,
                   help="HNSW (FAISS, pgvector's hnsw.ef_search): candidates explored per query")
    g.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF (FAISS nprobe, pgvector's ivfflat.probes): inverted lists visited per query")
    g.add_argument("--milvus-uri", default=None, metavar="URI",
                   help="Milvus server (http://host:19530; token from $CLIPLENS_MILVUS_TOKEN); "
                        "default: Milvus Lite in INDEX_DIR/milvus/")
    g.add_argument("--milvus-collection", default=None, metavar="NAME", help="default cliplens_<index folder name>")
    g.add_argument("--pg-uri", default=None, metavar="URI",
                   help="PostgreSQL with pgvector: postgresql://user@host:5432/db, or embedded (a private server "
                        "with its data in INDEX_DIR/pg; embedded:PATH for another folder); default $CLIPLENS_PG_URI, "
                        "else embedded")
    g.add_argument("--pg-table", default=None, metavar="NAME",
                   help="pgvector table (default cliplens_<folder>_<hash of its path>, or the one built for it)")
    g.add_argument("--pg-scan", default=None, choices=["auto", "index", "exact"],
                   help="pgvector: let the planner choose (auto, default), force the vector index, or scan every "
                        "row (exact)")


def add_build_flags(p: argparse.ArgumentParser) -> None:
    """Settings that only matter while a backend is built (``build-index``, ``index --backend ...``)."""
    g = p.add_argument_group("index backend build")
    g.add_argument("--ef-construction", type=positive_int, default=None, metavar="N",
                   help="FAISS HNSW: candidates explored per insertion while building the graph (FAISS default 40; "
                        "higher: better recall, slower build)")
    g.add_argument("--train-size", type=positive_int, default=None,
                   help="FAISS: vectors sampled to train IVF/PQ (default 39 per list, at least 10000)")
    g.add_argument("--pg-index", default=None, choices=["hnsw", "ivfflat", "none"],
                   help="pgvector: the vector index (default hnsw, vector_cosine_ops; none: exact sequential scans)")
    g.add_argument("--pg-m", type=positive_int, default=None, metavar="M", help="pgvector HNSW: links per node (16)")
    g.add_argument("--pg-lists", type=positive_int, default=None, metavar="N",
                   help="pgvector IVFFlat: lists (default rows/1000, at most 4*sqrt(rows))")


def check_build_flags(args) -> None:
    """Refuse build settings the chosen backend would not use, before anything slow runs (the registry says which
    backend takes which flag)."""
    from cliplens.errors import BackendError

    chosen = spec(getattr(args, "backend", None))
    given = {o.dest: o.flag for s in REGISTRY.values() for o in s.build if getattr(args, o.dest, None) is not None}
    for dest, flag in given.items():
        if dest not in {o.dest for o in chosen.build}:
            takers = owners(dest, build=True)
            what = ("a pgvector table is indexed" if takers == ["pgvector"] else
                    "an HNSW index is built" if dest == "ef_construction" else f"a {takers[0]} index is built")
            raise BackendError(f"{flag} sets how {what}, not the {chosen.name} backend: use it with "
                               + " or ".join(REGISTRY[t].usage for t in takers))
    if getattr(args, "ef_construction", None) is not None and chosen.not_hnsw is not None:
        wrong = chosen.not_hnsw(vars(args))
        if wrong:
            raise BackendError(f"--ef-construction applies to HNSW indexes, {wrong}")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding engine")
    g.add_argument("--engine", default="local", choices=["local", "ray"], help="where to embed (default local)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster: auto, or ray://HEAD:10001 (default: start a local Ray)")
    g.add_argument("--ray-actors", type=positive_int, default=None, help="actor pool size (default: one per CPU/GPU)")


def backend_options(args, *, build: bool = False) -> dict:
    """The options of ``args.backend`` taken from the flags (only those that backend understands)."""
    return spec(getattr(args, "backend", None)).options(vars(args), build=build,
                                                        progress=not getattr(args, "quiet", False))


def open_backend(store, args):
    """The vector index ``--backend`` names, over ``store`` (None for the default exact index)."""
    from cliplens.index.backends import open_index

    chosen = spec(getattr(args, "backend", None))
    if chosen.exact:
        return None
    return open_index(store, chosen.name, **backend_options(args))


def build_backend(store, args) -> tuple[object, float]:
    """Build ``--backend`` over ``store``; returns (the opened index, seconds)."""
    from cliplens.index.backends import build_index

    t0 = time.perf_counter()
    index = build_index(store, args.backend, **backend_options(args, build=True))
    return index, time.perf_counter() - t0


def engine_for(args):
    """The ``Engine`` ``--engine`` names for :func:`cliplens.indexing.index_source`: None (local) or a RayEngine. A
    ``ray://`` address is checked here (a TCP connect, seconds), before any data or model is loaded."""
    if getattr(args, "engine", "local") != "ray":
        return None
    from cliplens.distributed import RayEngine, RayOptions, check_ray_address

    check_ray_address(args.ray_address)
    return RayEngine(RayOptions(address=args.ray_address, actors=args.ray_actors))


def backend_settings(args, index) -> dict:
    """What ranked the hits, for ``search --json``: the backend's name and, for approximate ones, its settings."""
    chosen = spec(getattr(args, "backend", None))
    if index is None:
        return {"name": chosen.name}
    return {"name": chosen.name, **index.settings(), **chosen.knobs(vars(args))}


def backend_label(args, index) -> str:
    """A short name for the backend ``open_backend`` returned, e.g. "faiss HNSW32 (efSearch 64)"."""
    chosen = spec(getattr(args, "backend", None))
    if index is None or chosen.label is None:
        return chosen.name
    return chosen.label(backend_settings(args, index), chosen.describe_knobs(vars(args)))


def describe_backend(store, args, index) -> str:
    return index.describe()


def build_after_index(args, index_dir) -> None:
    """``cliplens index ... --backend NAME``: build that backend once the store is complete."""
    if spec(args.backend).exact:
        return
    from cliplens.store import IndexStore

    store = IndexStore.open(index_dir)
    index, seconds = build_backend(store, args)
    print(f"built {describe_backend(store, args, index)} in {seconds:.1f} s")


# --------------------------------------------------------------------------- build-index


def cmd_build_index(args) -> int:
    from cliplens.cli.common import default_index_dir
    from cliplens.store import IndexStore

    check_build_flags(args)
    store = IndexStore.open(args.index_dir or default_index_dir())
    index, seconds = build_backend(store, args)
    print(f"built {describe_backend(store, args, index)} over {len(store)} vectors in {seconds:.1f} s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("build-index", help="build a FAISS index, Milvus collection or pgvector table from an index "
                                           "folder",
                       description="Build a vector index backend from an index folder's stored vectors, "
                                   "without re-embedding. Re-running it rebuilds (FAISS), upserts (Milvus) or "
                                   "syncs the changed rows in one transaction (pgvector).")
    p.add_argument("--index-dir", type=Path, default=None, help="the index folder (default $CLIPLENS_HOME/indexes/...)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_backend_flags(p, default=None, required=True)
    add_build_flags(p)
    p.set_defaults(handler=cmd_build_index)

