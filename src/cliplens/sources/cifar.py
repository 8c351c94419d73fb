"""CIFAR-100 and CIFAR-10 from the official python archives.

The flow: find the data (extracted folder, archive, or download), check md5s against the
published ones, unpickle with an allow-list, then decode rows of 3072 bytes (1024 red, 1024 green,
1024 blue, each a row-major 32x32 plane) to uint8 (N, 32, 32, 3) RGB.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplens._files import cliplens_home
from cliplens.sources import _download, _pickle
from cliplens.sources._decode import fine_to_coarse, read_batch, read_names, rows_to_images
from cliplens.sources._download import bytes_digests, checksum_error, file_digests
from cliplens.sources._pickle import (
    check_pickle_lengths,
    loads_checked_pickle,
    read_pickle_file,
    safe_load_pickle,
)
from cliplens.errors import DatasetError

log = logging.getLogger(__name__)

CIFAR_URLS: dict[str, str] = {
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}

# Published md5s of each archive and of each file inside it. A module-level dict so that tests
# can make a fixture's sums count as official: monkeypatch.setitem(OFFICIAL_MD5, "cifar100", ...).
OFFICIAL_MD5: dict[str, dict[str, str]] = {
    "cifar100": {
        "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    "cifar10": {
        "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
}

# The opener used for downloads, looked up at call time so tests can swap in a fake.
_urlopen = urllib.request.urlopen


@dataclass(frozen=True)
class CifarLayout:
    """Where things are inside one data set's archive, and what its pickles call them."""

    title: str  # for messages: "CIFAR-100"
    archive: str
    folder: str
    split_files: Mapping[str, tuple[str, ...]]
    meta_file: str
    labels_key: bytes
    names_key: bytes
    coarse_labels_key: bytes | None = None
    coarse_names_key: bytes | None = None
    num_classes: int | None = None  # how many names the meta file must list
    num_superclasses: int | None = None


CIFAR_LAYOUTS: dict[str, CifarLayout] = {
    "cifar100": CifarLayout(
        title="CIFAR-100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        split_files={"train": ("train",), "test": ("test",)},
        meta_file="meta",
        labels_key=b"fine_labels",
        names_key=b"fine_label_names",
        coarse_labels_key=b"coarse_labels",
        coarse_names_key=b"coarse_label_names",
        num_classes=100,
        num_superclasses=20,
    ),
    "cifar10": CifarLayout(
        title="CIFAR-10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta_file="batches.meta",
        labels_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
}

SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields has no single truth value
class LabeledImages:
    source: str  # "cifar100" or "cifar10"
    split: str  # "train" or "test"
    images: np.ndarray  # uint8 (N, 32, 32, 3) RGB, C-contiguous
    labels: np.ndarray  # int64 (N,) fine labels
    class_names: tuple[str, ...]  # the data set's own names, e.g. "aquarium_fish"
    coarse_labels: np.ndarray | None  # int64 (N,), CIFAR-100 only
    superclass_names: tuple[str, ...] | None
    fine_to_coarse: np.ndarray | None  # int64 (num_classes,), from the split's data; -1 if unseen
    refs: tuple[str, ...]  # per-image filenames from the pickle
    # {"verified": bool, "archive_md5": md5 of the archive beside the folder or None,
    #  "files": {"cifar-100-python/test": {"md5", "sha256", "size"}, ...}}; JSON-serialisable
    fingerprint: dict

    def __len__(self) -> int:
        return len(self.labels)


def default_data_dir() -> Path:
    """``$CLIPLENS_HOME/data``, CLIPLENS_HOME defaulting to ``~/.cache/cliplens``."""
    return cliplens_home() / "data"


def load_cifar(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = True,
    verify: bool = True,
    limit: int | None = None,
    progress: bool = True,
) -> LabeledImages:
    """Load one split of CIFAR-100 or CIFAR-10, finding, downloading and verifying as needed.

    ``data_dir`` may be a folder holding ``cifar-100-python/`` or ``cifar-100-python.tar.gz``,
    the ``cifar-100-python`` folder itself, or the archive itself. ``limit`` keeps the first N
    images, after the full files have been verified.
    """
    source = _canonical_name(name)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0
    ):
        raise DatasetError(f"limit must be a non-negative integer, got {limit!r}")
    layout = CIFAR_LAYOUTS[source]
    folder, archive_md5 = _locate(source, data_dir, download=download, verify=verify, progress=progress)

    # Hash every file we are about to unpickle before unpickling any of it: an official file is
    # known to be intact and harmless, so verification also guards the unpickler.
    files: dict[str, dict[str, Any]] = {}
    contents: dict[str, _Read] = {}
    for file in (*layout.split_files[split], layout.meta_file):
        path = folder / file
        if not path.is_file():
            raise DatasetError(f"{path} is missing; re-extract or re-download {layout.archive}")
        contents[file] = read = _read_checked(path)
        expected = OFFICIAL_MD5[source][file]
        if verify and read.digests["md5"] != expected:
            raise checksum_error(str(path), read.digests["md5"], expected)
        files[f"{layout.folder}/{file}"] = read.digests

    meta_path = folder / layout.meta_file
    meta = contents.pop(layout.meta_file).load(meta_path)
    class_names = read_names(meta, layout.names_key, meta_path, count=layout.num_classes)
    superclass_names = None
    if layout.coarse_names_key is not None:
        superclass_names = read_names(meta, layout.coarse_names_key, meta_path, count=layout.num_superclasses)

    # CIFAR-10's train split is five batches; everything else is one file
    batches = [
        read_batch(
            folder / file,
            contents.pop(file).load(folder / file),
            labels_key=layout.labels_key,
            num_classes=len(class_names),
            coarse_labels_key=layout.coarse_labels_key,
            num_superclasses=len(superclass_names or ()),
        )
        for file in layout.split_files[split]
    ]
    rows = np.concatenate([b.rows for b in batches]) if len(batches) > 1 else batches[0].rows
    labels = np.concatenate([b.labels for b in batches])
    coarse = None
    if superclass_names is not None:
        coarse = np.concatenate([b.coarse_labels for b in batches])
    refs = [ref for b in batches for ref in b.refs]

    # The map is a property of the data set, so it comes from the whole split, before `limit`.
    f2c = None
    if coarse is not None and superclass_names is not None:
        f2c = fine_to_coarse(labels, coarse, class_names, superclass_names, folder)

    n = len(labels) if limit is None else min(limit, len(labels))
    images = rows_to_images(rows[:n])
    log.info("loaded %d %s %s images from %s", n, layout.title, split, folder)
    return LabeledImages(
        source=source,
        split=split,
        images=images,
        labels=labels[:n].copy(),
        class_names=class_names,
        coarse_labels=None if coarse is None else coarse[:n].copy(),
        superclass_names=superclass_names,
        fine_to_coarse=f2c,
        refs=tuple(refs[:n]),
        fingerprint={"verified": verify, "archive_md5": archive_md5, "files": files},
    )


@dataclass
class _Read:
    """One pickle read into memory: its digests, and whether its length fields were sound (the error if not)."""

    data: bytes | None  # None: too large to read (its digests streamed), refused when loaded
    digests: dict[str, Any]
    damage: DatasetError | None

    def load(self, path: Path) -> dict:
        if self.damage is not None:  # raised only now, in the order the old one-pass loader met it
            raise self.damage
        if self.data is None:
            return safe_load_pickle(path)  # says why it is refused
        obj, self.data = loads_checked_pickle(self.data, path), None  # the bytes go as soon as they are parsed
        return obj


def _read_checked(path: Path) -> _Read:
    """Read ``path`` once; its md5 and sha256 on two threads (hashlib lets go of the GIL on large inputs) while
    this one checks the pickle's length fields. Nothing is unpickled yet."""
    if path.stat().st_size > _pickle.MAX_PICKLE_BYTES:  # no CIFAR file: hashed as it streams, refused at load
        return _Read(None, file_digests(path), None)
    data = read_pickle_file(path)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="cliplens-hash") as pool:
        digests = bytes_digests(data, pool)
        try:
            check_pickle_lengths(data, path)
            damage = None
        except DatasetError as exc:
            damage = exc
        return _Read(data, digests(), damage)


def _canonical_name(name: str) -> str:
    # "CIFAR-100", "cifar_100" and "cifar100" all mean the same data set
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else None
    if key not in CIFAR_LAYOUTS:
        raise DatasetError(f"unknown data set {name!r}; expected one of: {', '.join(CIFAR_LAYOUTS)}")
    return key


def _locate(
    source: str, data_dir: str | Path | None, *, download: bool, verify: bool, progress: bool
) -> tuple[Path, str | None]:
    """Return the extracted folder (extracting or downloading first if needed) and the md5 of
    the archive beside it, if there is one.

    The archive's md5 is recorded whenever the archive is there, not only on the run that
    extracts it, so the fingerprint of the first load and of later ones agree. It is checked
    against the official sum only when the archive is actually used (extracted).
    """
    layout = CIFAR_LAYOUTS[source]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.name == layout.folder and not root.exists():
        root = root.parent  # the folder-to-be: download and extract it beside, as usual

    if root.is_file():  # the archive itself: the folder beside it only if it was extracted from this archive
        beside = root.parent / layout.folder
        if beside.is_dir():
            record, digests = _download.read_record(beside), file_digests(root)
            if record is None:
                raise DatasetError(f"{beside} exists but was not extracted from {root.name} by cliplens, so it may "
                                   f"hold other files: pass --data-dir {beside} to use that folder, or move it away "
                                   "to extract the archive")
            if (record.get("sha256"), record.get("size")) == (digests["sha256"], digests["size"]):
                return beside, digests["md5"]
            log.warning("%s was extracted from another %s; extracting this one in its place", beside, root.name)
            return _from_archive(source, root, verify=verify, digests=digests, replace=True)
        return _from_archive(source, root, verify=verify)
    if root.name == layout.folder or (root / layout.meta_file).is_file():  # the folder itself
        return root, _md5_if_present(root.parent / layout.archive)
    for other in CIFAR_LAYOUTS.values():
        if other is not layout and (root / other.meta_file).is_file():
            raise DatasetError(f"{root} looks like the {other.title} folder, not {layout.title}")
    archive = root / layout.archive
    if (root / layout.folder).is_dir():
        record = _download.read_record(root / layout.folder) if archive.is_file() else None
        if record is not None:  # cliplens extracted it: from the archive that is beside it now?
            digests = file_digests(archive)
            if (record.get("sha256"), record.get("size")) != (digests["sha256"], digests["size"]):
                log.warning("%s was extracted from another %s; extracting this one in its place",
                            root / layout.folder, archive.name)
                return _from_archive(source, archive, verify=verify, digests=digests, replace=True)
            return root / layout.folder, digests["md5"]
        return root / layout.folder, _md5_if_present(archive)  # a folder of the user's: theirs to vouch for
    if archive.is_file():
        return _from_archive(source, archive, verify=verify)

    if root.name.endswith((".tar.gz", ".tgz")):
        raise DatasetError(f"{root} does not exist; pass the folder or archive you have")
    if not download:
        raise DatasetError(
            f"{layout.title} not found in {root} (looked for {layout.folder}/ and "
            f"{layout.archive}); put the archive there, pass --data-dir, or allow downloading"
        )
    url = CIFAR_URLS[source]
    log.info("downloading %s to %s", url, archive)
    md5 = _download.download(
        url,
        archive,
        opener=_urlopen,
        expected_md5=OFFICIAL_MD5[source][layout.archive] if verify else None,
        progress=progress,
    )
    return _download.extract(archive, layout.folder, root), md5


def _md5_if_present(archive: Path) -> str | None:
    return file_digests(archive)["md5"] if archive.is_file() else None


def _from_archive(source: str, archive: Path, *, verify: bool, digests: dict | None = None,
                  replace: bool = False) -> tuple[Path, str]:
    layout = CIFAR_LAYOUTS[source]
    digests = digests or file_digests(archive)
    md5 = digests["md5"]  # also recorded when not verifying
    expected = OFFICIAL_MD5[source][layout.archive]
    if verify and md5 != expected:
        raise checksum_error(str(archive), md5, expected)
    return _download.extract(archive, layout.folder, archive.parent, digests=digests, replace=replace), md5


def missing_data(name: str, data_dir: str | Path | None) -> str | None:
    """A one-line description when the data set is neither on disk nor downloadable right now, else None.

    On disk means where :func:`load_cifar` looks (the extracted folder or the archive); downloadable means the
    official host answers a TCP connect within a few seconds. Lets ``demo`` name every missing input at once.
    """
    from cliplens import _hub

    source = _canonical_name(name)
    layout = CIFAR_LAYOUTS[source]
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    for place in (root, root / layout.folder, root / layout.archive, root.parent / layout.folder):
        if place.is_file() or (place.is_dir() and (place.name == layout.folder or (place / layout.meta_file).is_file())):
            return None
    if _hub.reachable(CIFAR_URLS[source]):
        return None
    return (f"{layout.title} is not in {root} and {CIFAR_URLS[source].split('/')[2]} cannot be reached: "
            f"on a connected machine download {CIFAR_URLS[source]} and put {layout.archive} in {root} "
            "(or pass --data-dir)")
