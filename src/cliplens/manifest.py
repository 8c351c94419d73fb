"""The index manifest as typed values: the one module that reads or writes ``manifest.json``.

    ModelInfo    what produced the vectors (name, tag, weights sha256, dim, preprocessing, precision)
    SourceInfo   what was embedded (cifar / folder / list, split, root, fingerprint of the files)
    Manifest     everything else an index records: counts, dims, dtype, identity, class names, the digests of
                 its own files, speed

Schema versions: 1 (cliplens up to 0.x: the files at the top of the index folder) and 2 (generations, and a
digest of ``items.parquet``). :func:`parse` reads both, refuses anything else or any ill-typed field with a
:class:`~cliplens.errors.StoreError` that names the file; keys it does not know are kept (``extra``) and written
back unchanged, so a newer cliplens's manifest survives an older one's rewrite.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cliplens.errors import StoreError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class ModelInfo:
    """What identifies the embeddings a model produces; recorded in every index manifest."""

    name: str
    pretrained: str | None = None  # the tag ("openai") or None when weights came from a file
    weights_path: str | None = None
    weights_sha256: str | None = None
    embed_dim: int = 0
    image_size: int = 0
    context_length: int = 0
    quick_gelu: bool = False
    preprocess: str = ""  # human-readable description of the eval transform
    precision: str = "exact"

    def label(self) -> str:
        """The one way cliplens names a model: "ViT-B-32-quickgelu/openai (weights sha256 1a2b3c4d5e6f)"."""
        sha = (self.weights_sha256 or "none")[:12]
        return f"{self.name}/{self.pretrained or 'file'} (weights sha256 {sha})"

    def short_label(self) -> str:
        """Name and tag, or name and weights file: "ViT-B-32-quickgelu/openai"."""
        if self.pretrained:
            return f"{self.name}/{self.pretrained}"
        if self.weights_path and ":" not in self.name:
            return f"{self.name} (weights {self.weights_path})"
        return self.name

    def to_json(self) -> dict:
        return asdict(self)

    def same_vectors(self, other: "ModelInfo") -> bool:
        """True when both produce the same embedding space (same model, same weights)."""
        return self.name == other.name and self.weights_sha256 == other.weights_sha256


@dataclass(frozen=True)
class SourceInfo:
    name: str  # "cifar100", "folder", "list"
    type: str | None = None  # "folder" / "list" for sources that are indexed incrementally; None for data sets
    split: str | None = None
    root: str | None = None  # the folder (or the list file) the items' paths are relative to
    fingerprint: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # e.g. exclude, include_hidden, max_megapixels


@dataclass(frozen=True)
class Manifest:
    count: int
    embedding_dim: int
    dtype: str
    model: ModelInfo
    source: SourceInfo | None = None
    identity: dict = field(default_factory=dict)  # everything that fixes the embeddings' bytes
    format_version: int = SCHEMA_VERSION
    cliplens_version: str = ""
    created: str = ""
    preprocess: str = ""
    class_names: tuple[str, ...] | None = None
    superclass_names: tuple[str, ...] | None = None
    fine_to_coarse: tuple[int, ...] | None = None
    files: dict = field(default_factory=dict)  # file name -> {"sha256": ..., "bytes": ...}
    stats: dict | None = None
    folder: dict | None = None  # incremental sources: summary of the last run, skipped files
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "model", "source")}
        out["model"] = asdict(self.model)
        out["source"] = _source_json(self.source) if self.source is not None else None
        for key in ("class_names", "superclass_names", "fine_to_coarse"):
            out[key] = list(out[key]) if out[key] is not None else None
        if self.format_version < 2:
            out.pop("files", None)
        return {**self.extra, **out}


def _source_json(s: SourceInfo) -> dict:
    out = {"name": s.name, "split": s.split, "fingerprint": s.fingerprint}
    if s.type is not None:
        out["type"] = s.type
    if s.root is not None:
        out["root"] = s.root
    out.update(s.options)
    return out


# --------------------------------------------------------------------------- parsing


def _want(path, key: str, value, types, *, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise StoreError(f"{path} is damaged: {key} is {type(value).__name__}, not "
                         f"{getattr(types, '__name__', types)}; rebuild the index")
    return value


def parse(obj: Any, path: str | Path = "manifest.json") -> Manifest:
    """A Manifest from the JSON object of a manifest file; StoreError naming ``path`` if anything is off."""
    if not isinstance(obj, dict):
        raise StoreError(f"{path} is damaged (not a JSON object); rebuild the index")
    version = obj.get("format_version")
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path} has format {version!r}; this cliplens reads formats "
                         f"{', '.join(map(str, READABLE_VERSIONS))}: rebuild the index with this version")
    known = {f.name for f in fields(Manifest)} - {"extra"}
    model = _want(path, "model", obj.get("model"), dict)
    _want(path, "model.name", model.get("name"), str)
    model_fields = {f.name for f in fields(ModelInfo)}
    model_info = ModelInfo(**{k: v for k, v in model.items() if k in model_fields})
    src = _want(path, "source", obj.get("source"), dict, optional=True)
    source = None
    if src is not None:
        base = {"name", "type", "split", "root", "fingerprint"}
        source = SourceInfo(name=str(src.get("name") or src.get("type") or "?"), type=src.get("type"),
                            split=src.get("split"), root=src.get("root"),
                            fingerprint=_want(path, "source.fingerprint", src.get("fingerprint") or {}, dict),
                            options={k: v for k, v in src.items() if k not in base})
    count = _want(path, "count", obj.get("count"), int)
    dim = _want(path, "embedding_dim", obj.get("embedding_dim"), int)
    if count < 0 or dim < 1:
        raise StoreError(f"{path} is damaged: count {count}, embedding_dim {dim}; rebuild the index")

    def names(key):
        v = _want(path, key, obj.get(key), list, optional=True)
        if v is not None and not all(isinstance(x, str) for x in v):
            raise StoreError(f"{path} is damaged: {key} holds non-strings; rebuild the index")
        return tuple(v) if v is not None else None

    f2c = _want(path, "fine_to_coarse", obj.get("fine_to_coarse"), list, optional=True)
    if f2c is not None and not all(isinstance(x, int) for x in f2c):
        raise StoreError(f"{path} is damaged: fine_to_coarse holds non-integers; rebuild the index")
    return Manifest(
        count=count, embedding_dim=dim, dtype=_want(path, "dtype", obj.get("dtype"), str), model=model_info,
        source=source, identity=_want(path, "identity", obj.get("identity") or {}, dict),
        format_version=version, cliplens_version=str(obj.get("cliplens_version") or ""),
        created=str(obj.get("created") or ""), preprocess=str(obj.get("preprocess") or ""),
        class_names=names("class_names"), superclass_names=names("superclass_names"),
        fine_to_coarse=tuple(f2c) if f2c is not None else None,
        files=_want(path, "files", obj.get("files") or {}, dict),
        stats=_want(path, "stats", obj.get("stats"), dict, optional=True),
        folder=_want(path, "folder", obj.get("folder"), dict, optional=True),
        extra={k: v for k, v in obj.items() if k not in known},
    )


def read(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path} ({type(exc).__name__}); rebuild the index") from None
    return parse(obj, path)


def build(*, count: int, dim: int, dtype: str, identity: dict, created: str, version: str, fields_: dict,
          files: dict) -> Manifest:
    """A new Manifest from what an indexer passes to the writer (``fields_``: model, source, class names...)."""
    obj = {"format_version": SCHEMA_VERSION, "cliplens_version": version, "created": created, "count": count,
           "embedding_dim": dim, "dtype": dtype, "identity": identity, "files": files, **fields_}
    model = obj.get("model")
    if isinstance(model, ModelInfo):
        obj["model"] = asdict(model)
    if isinstance(obj.get("source"), SourceInfo):
        obj["source"] = _source_json(obj["source"])
    return parse(json.loads(json.dumps(obj)), "the new manifest")
