"""One indexing entry point for every source: ``index_source(source, encoder, index_dir, engine=..., reuse=...)``.

    open_source("cifar100" | "list" | FOLDER, ...)  ->  a source
    index_source(source, encoder, index_dir, engine=LocalEngine() | RayEngine(...))  ->  IndexResult

Two kinds of source, one driver:

- a labelled image set held in memory (CIFAR: ``LabeledImages``) is embedded whole, resumably, in fixed batches
  (:func:`cliplens.embed.index_labeled`);
- a file listing (a photo folder, an image list: :mod:`cliplens.indexing.listings`) is indexed incrementally:
  unchanged files keep their vectors, moved or copied ones are reused by content sha256 (``reuse``), only new
  ones are embedded (:func:`cliplens.folder_index.index_files`).

Either way the embedding runs on an :class:`Engine` (local threads, or Ray) into the same resumable writer, and
the result is one new generation of the index folder (:mod:`cliplens.layout`). A new source is one file (a
listing class, or a loader returning ``LabeledImages``) plus one line in :data:`SOURCES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from cliplens.errors import DatasetError


class Engine(Protocol):
    """Embeds the rows of a source into a writer, resumably; the local and Ray engines share this contract.

    Rows a source cannot load are recorded in its ``failed`` dict (row -> reason) and come back as zero vectors.
    """

    def embed_into(self, source, encoder, writer, *, batch_size: int, checkpoint_every: int = 4, workers: int = 2,
                   progress: bool = True, on_batch: Callable[[int], None] | None = None): ...


class LocalEngine:
    """This process: a thread pool preprocessing a few batches ahead of the model."""

    in_process = True  # what the source's decoding threads make (thumbnails) stays here to be used

    def embed_into(self, source, encoder, writer, **kwargs):
        from cliplens.embed import embed_into

        return embed_into(source, encoder, writer, **kwargs)


@dataclass(frozen=True)
class IndexOptions:
    batch_size: int | None = None  # None: chosen by a quick probe of the model and device
    dtype: str = "float32"
    checkpoint_every: int = 4  # batches between resume checkpoints (whole sets)
    progress: bool = True
    store_images: bool = True  # whole sets of tiny images: keep the thumbnails
    max_megapixels: float = 100.0  # file listings: larger images are skipped (checked on the header)
    rebuild: bool = False  # replace a complete index of other settings (else IndexExistsError)
    replace_other: bool = False  # replace an index of another kind of source (a CIFAR split by a folder, ...)


@dataclass(frozen=True)
class IndexResult:
    manifest: object  # the Manifest of the index now current
    embedded: int  # images embedded by this run (0: nothing to do)
    resumed_from: int = 0
    seconds: float = 0.0
    summary: object | None = None  # file listings: FolderIndexSummary (added, updated, removed, reused, ...)


def index_source(source, encoder, index_dir: str | Path, *, engine: Engine | None = None, reuse: bool = True,
                 options: IndexOptions = IndexOptions()) -> IndexResult:
    from cliplens.sources import LabeledImages
    from cliplens.store import read_current_manifest

    engine = engine or LocalEngine()
    if isinstance(source, LabeledImages):
        from cliplens.embed import index_labeled

        manifest, stats = index_labeled(source, encoder, index_dir, batch_size=options.batch_size,
                                        dtype=options.dtype, checkpoint_every=options.checkpoint_every,
                                        progress=options.progress, store_images=options.store_images,
                                        embed_fn=engine.embed_into, rebuild=options.rebuild)
        return IndexResult(manifest, stats.count, stats.resumed_from, stats.seconds)
    from cliplens.folder_index import FolderIndexOptions, index_files

    folder_options = FolderIndexOptions(max_megapixels=options.max_megapixels, batch_size=options.batch_size,
                                        dtype=options.dtype, progress=options.progress,
                                        exclude=tuple(getattr(source, "exclude", ())),
                                        include_hidden=getattr(source, "include_hidden", False),
                                        rebuild=options.rebuild, replace_other=options.replace_other)
    summary = index_files(source, encoder, index_dir, options=folder_options, embed_fn=engine.embed_into,
                          reuse=reuse)
    return IndexResult(read_current_manifest(index_dir), summary.added + summary.updated,
                       seconds=summary.embedded_seconds, summary=summary)


# --------------------------------------------------------------------------- the sources


def _cifar(name: str, *, path=None, split: str = "test", data_dir=None, verify: bool = True, limit=None,
           progress: bool = True, **_):
    from cliplens.sources import load_cifar

    return load_cifar(name, split, data_dir=data_dir, verify=verify, limit=limit, progress=progress)


def _folder(name: str, *, path=None, exclude=(), include_hidden: bool = False, **_):
    from cliplens.indexing.listings import FolderListing

    return FolderListing(Path(path or name), exclude=tuple(exclude), include_hidden=include_hidden)


def _list(name: str, *, path=None, **_):
    from cliplens.indexing.listings import ListListing

    if path is None:
        raise DatasetError("an image list needs its file: cliplens index list FILE.csv|.jsonl|.parquet")
    return ListListing(Path(path))


SOURCES: dict[str, Callable] = {"cifar100": _cifar, "cifar10": _cifar, "folder": _folder, "list": _list}


def open_source(spec: str, **options):
    """The source ``spec`` names: a registered name (cifar100, cifar10, list, folder) or a folder's path."""
    key = spec.lower().replace("-", "")
    if key in SOURCES:
        return SOURCES[key](key, **options)
    if Path(spec).expanduser().is_dir():
        return _folder(spec, **{**options, "path": spec})
    raise DatasetError(f"unknown source {spec!r}: use {', '.join(SOURCES)} FILE, or the path of an image folder")
