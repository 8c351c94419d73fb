"""Builders for tiny CIFAR-format data sets on disk, shaped like the official python archives.

Plain functions, not pytest fixtures, so any test can import them (``import cifar_fixture``).
The files match the originals, which Python 2's cPickle wrote: protocol 2, strings as Python 2
``str`` (so ``encoding="bytes"`` gives bytes keys such as ``b'data'``), ``b'data'`` a uint8
(N, 3072) array of channel-planar rows, labels as lists of int, filenames as bytes, and numpy's
reconstructor named ``numpy.core.multiarray``. Their md5s are computed here; they are of course
not the official ones, so tests either pass ``verify=False`` or call ``official_md5_patch`` to make
them count as official.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shlex
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import write_cifar_pickle  # shared with the benchmarks

# fmt: off
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
CIFAR100_SUPERCLASSES: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15,
    3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4,
    2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# fmt: on
_ARCHIVE_NAMES = {"cifar100": "cifar-100-python.tar.gz", "cifar10": "cifar-10-python.tar.gz"}


@dataclass
class CifarFixture:
    name: str  # "cifar100" or "cifar10", as load_cifar calls it
    root: Path  # the data dir: holds the folder and/or the archive
    folder: Path  # root / "cifar-100-python"; exists only when built with folder=True
    archive: Path | None  # root / "cifar-100-python.tar.gz" when built with archive=True
    class_names: tuple[str, ...]
    superclass_names: tuple[str, ...] | None
    images: dict[str, np.ndarray]  # split -> uint8 (N, 32, 32, 3) RGB, in file order
    labels: dict[str, np.ndarray]  # split -> int64 (N,)
    coarse_labels: dict[str, np.ndarray] | None
    refs: dict[str, tuple[str, ...]]  # split -> filenames
    md5: dict[str, str]  # file name (and archive name) -> md5; same keys as OFFICIAL_MD5[name]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows_of(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the files' (N, 3072) rows: all red, then green, then blue."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _make_images(
    rng: np.random.Generator, colours: np.ndarray, per_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled images, each its class's base colour plus per-pixel noise."""
    labels = rng.permutation(np.repeat(np.arange(len(colours)), per_class)).astype(np.int64)
    noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels


def _filenames(labels: np.ndarray, class_names: tuple[str, ...], start: int) -> list[bytes]:
    return [f"{class_names[c]}_s_{start + i:06d}.png".encode() for i, c in enumerate(labels)]


def _finish(fx: CifarFixture, *, archive: bool, folder: bool) -> CifarFixture:
    """Hash the written files, pack the archive if asked, drop the folder if not asked."""
    if not (archive or folder):
        raise ValueError("ask for archive=True, folder=True or both")
    fx.md5 = {p.name: md5_of(p) for p in sorted(fx.folder.iterdir())}
    if archive:
        fx.archive = fx.root / _ARCHIVE_NAMES[fx.name]
        with tarfile.open(fx.archive, "w:gz") as tar:
            tar.add(fx.folder, arcname=fx.folder.name)
        fx.md5[fx.archive.name] = md5_of(fx.archive)
    else:
        fx.archive = None
    if not folder:
        shutil.rmtree(fx.folder)
    return fx


def make_cifar100(
    root: Path,
    *,
    per_class_test: int = 2,
    per_class_train: int = 5,
    seed: int = 0,
    archive: bool = True,
    folder: bool = False,
) -> CifarFixture:
    """Write ``root/cifar-100-python/{train,test,meta}`` and/or ``root/cifar-100-python.tar.gz``."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(len(CIFAR100_CLASSES), 3))
    f2c = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)
    data_folder = root / "cifar-100-python"
    data_folder.mkdir(parents=True, exist_ok=False)
    fx = CifarFixture(
        name="cifar100",
        root=root,
        folder=data_folder,
        archive=None,
        class_names=CIFAR100_CLASSES,
        superclass_names=CIFAR100_SUPERCLASSES,
        images={},
        labels={},
        coarse_labels={},
        refs={},
        md5={},
    )
    for split, per_class, title in (
        ("train", per_class_train, b"training batch 1 of 1"),
        ("test", per_class_test, b"testing batch 1 of 1"),
    ):
        images, labels = _make_images(rng, colours, per_class)
        filenames = _filenames(labels, CIFAR100_CLASSES, start=0 if split == "train" else 100_000)
        batch = {
            b"filenames": filenames,
            b"batch_label": title,
            b"fine_labels": labels.tolist(),
            b"coarse_labels": f2c[labels].tolist(),
            b"data": rows_of(images),
        }
        write_cifar_pickle(data_folder / split, batch)
        fx.images[split], fx.labels[split] = images, labels
        fx.coarse_labels[split] = f2c[labels]
        fx.refs[split] = tuple(f.decode() for f in filenames)
    meta = {
        b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES],
        b"coarse_label_names": [n.encode() for n in CIFAR100_SUPERCLASSES],
    }
    write_cifar_pickle(data_folder / "meta", meta)
    return _finish(fx, archive=archive, folder=folder)


def make_cifar10(
    root: Path,
    *,
    per_class_test: int = 2,
    per_class_train: int = 5,
    seed: int = 0,
    archive: bool = True,
    folder: bool = False,
) -> CifarFixture:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and/or the
    archive ``root/cifar-10-python.tar.gz``; the train images are split over the five batches."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(len(CIFAR10_CLASSES), 3))
    data_folder = root / "cifar-10-batches-py"
    data_folder.mkdir(parents=True, exist_ok=False)
    fx = CifarFixture(
        name="cifar10",
        root=root,
        folder=data_folder,
        archive=None,
        class_names=CIFAR10_CLASSES,
        superclass_names=None,
        images={},
        labels={},
        coarse_labels=None,
        refs={},
        md5={},
    )
    train_images, train_labels = _make_images(rng, colours, per_class_train)
    test_images, test_labels = _make_images(rng, colours, per_class_test)
    train_names = _filenames(train_labels, CIFAR10_CLASSES, start=0)
    test_names = _filenames(test_labels, CIFAR10_CLASSES, start=100_000)
    bounds = np.linspace(0, len(train_labels), 6).astype(int)  # five near-equal batches
    for b in range(5):
        part = slice(bounds[b], bounds[b + 1])
        batch = {
            b"batch_label": f"training batch {b + 1} of 5".encode(),
            b"labels": train_labels[part].tolist(),
            b"data": rows_of(train_images[part]),
            b"filenames": train_names[part],
        }
        write_cifar_pickle(data_folder / f"data_batch_{b + 1}", batch)
    test_batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels.tolist(),
        b"data": rows_of(test_images),
        b"filenames": test_names,
    }
    write_cifar_pickle(data_folder / "test_batch", test_batch)
    meta = {
        b"num_cases_per_batch": int(bounds[1]),
        b"label_names": [n.encode() for n in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    write_cifar_pickle(data_folder / "batches.meta", meta)
    fx.images = {"train": train_images, "test": test_images}
    fx.labels = {"train": train_labels, "test": test_labels}
    fx.refs = {
        "train": tuple(f.decode() for f in train_names),
        "test": tuple(f.decode() for f in test_names),
    }
    return _finish(fx, archive=archive, folder=folder)


class _RunsShell:
    """Unpickling this calls os.system(command): what a tampered CIFAR file could do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def make_malicious_pickle(path: Path, marker: Path) -> None:
    """A CIFAR-looking pickle whose b'data' runs ``touch MARKER`` when unpickled naively."""
    payload = _RunsShell(f"touch {shlex.quote(str(marker))}")
    batch = {
        b"filenames": [b"x.png"],
        b"batch_label": b"testing batch 1 of 1",
        b"fine_labels": [0],
        b"coarse_labels": [4],
        b"data": payload,
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_malicious_cifar100(
    root: Path, marker: Path, *, archive: bool = True, folder: bool = False
) -> CifarFixture:
    """A CIFAR-100 layout whose ``test`` file is ``make_malicious_pickle``; md5s match it."""
    fx = make_cifar100(root, archive=False, folder=True)
    make_malicious_pickle(fx.folder / "test", marker)
    return _finish(fx, archive=archive, folder=folder)


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file to ``fraction`` of its size, as an interrupted copy or download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def official_md5_patch(monkeypatch: Any, fx: CifarFixture) -> None:
    """Make the fixture's md5s count as official for the rest of the test, so the verified path
    runs end to end. ``monkeypatch`` is pytest's (anything with ``setitem``); it undoes this."""
    from cliplens.sources import cifar

    monkeypatch.setitem(cifar.OFFICIAL_MD5, fx.name, dict(fx.md5))
