"""File listings: the sources indexed incrementally, file by file (a photo folder, an image list).

A listing says which image files make up the source (relative path, size, mtime), which were refused before
any file was opened (with a reason), and what it knows about each file beyond its pixels: the columns it adds
to ``items.parquet`` (captions, labels, sidecar metadata) and the class names its labels index. The incremental
driver (:func:`cliplens.folder_index.index_files`) does the rest the same way for every listing: hashing, reuse
by content sha256, embedding what is new, writing the generation. A new file-based source is one class here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cliplens.sources.folder import FolderFile, read_sidecar, sidecar_names, walk_folder
from cliplens.sources.listfile import ImageList, list_files, read_list


@dataclass
class FolderListing:
    """Every image under ``root`` (see :func:`walk_folder`); ``name.txt``/``name.json`` sidecars give captions."""

    root: Path
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    kind: str = "folder"
    files: list[FolderFile] = field(default_factory=list, init=False)
    refused: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        self.files = walk_folder(self.root, exclude=self.exclude, include_hidden=self.include_hidden,
                                 skipped=self.refused)  # link loops, links out, names that are not UTF-8

    def columns(self, rels: list[str]) -> dict[str, list]:
        listed: dict[str, set[str]] = {}  # folder -> its file names: one listdir per folder, not 4 stats per image
        captions = []
        for rel in rels:
            folder, _, name = rel.rpartition("/")
            if folder not in listed:
                try:
                    listed[folder] = set(os.listdir(self.root / folder))
                except OSError:
                    listed[folder] = set()
            has = any(n in listed[folder] for n in sidecar_names(name))
            captions.append(read_sidecar(self.root / rel, root=self.root) if has else (None, None))
        return {"caption": [c for c, _ in captions], "meta": [m for _, m in captions]}

    def class_names(self, rels: list[str]) -> tuple[str, ...] | None:
        return None

    def source(self) -> dict:
        return {"type": "folder", "name": "folder", "root": str(self.root), "exclude": list(self.exclude),
                "include_hidden": self.include_hidden}

    def describe(self) -> str:
        return f"under {self.root}"


@dataclass
class ListListing:
    """The images a list file names (CSV / JSONL / Parquet with ``path``, optional ``caption`` and ``label``)."""

    list_file: Path
    kind: str = "list"
    files: list[FolderFile] = field(default_factory=list, init=False)
    refused: list[tuple[str, str]] = field(default_factory=list, init=False)
    image_list: ImageList = field(init=False)

    def __post_init__(self) -> None:
        self.image_list = read_list(self.list_file)
        self.files, missing = list_files(self.image_list)
        self.refused = self.image_list.skipped + missing

    @property
    def root(self) -> Path:
        return self.image_list.root

    def columns(self, rels: list[str]) -> dict[str, list]:
        entries = [self.image_list.entries[rel] for rel in rels]
        out: dict[str, list] = {"caption": [e.captions[0] if e.captions else None for e in entries],
                                "captions": [json.dumps(list(e.captions), ensure_ascii=False) for e in entries]}
        names = self.class_names(rels)
        if names is not None:
            ids = {n: i for i, n in enumerate(names)}
            out["label"] = [ids[e.label] for e in entries]
            out["label_name"] = [e.label for e in entries]
        return out

    def class_names(self, rels: list[str]) -> tuple[str, ...] | None:
        """The labels, sorted, when every indexed image has one (a half-labelled list is not a labelled set)."""
        labels = [self.image_list.entries[rel].label for rel in rels]
        if not self.image_list.has_labels or not labels or None in labels:
            return None
        return tuple(sorted(set(labels)))

    def source(self) -> dict:
        return {"type": "list", "name": "list", "root": str(self.root), "list_file": str(self.image_list.path)}

    def describe(self) -> str:
        return f"in {self.image_list.path}"
