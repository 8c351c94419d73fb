"""Decoding and validating the contents of CIFAR pickles (after the restricted unpickler, cliplens.sources._pickle).

The files may be user-supplied (--no-verify), so every field is checked before use and a
problem is reported with the file's name rather than as an IndexError three modules later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cliplens.errors import DatasetError

ROW_BYTES = 3 * 32 * 32  # one image: 1024 red, then 1024 green, then 1024 blue bytes


class Batch(NamedTuple):
    rows: np.ndarray  # uint8 (N, 3072), as stored
    labels: np.ndarray  # int64 (N,)
    coarse_labels: np.ndarray | None  # int64 (N,), CIFAR-100 only
    refs: list[str]  # per-image filenames


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """(N, 3072) channel-planar rows -> C-contiguous uint8 (N, 32, 32, 3) RGB."""
    # each plane is row-major 32x32; a fresh array (the caller may drop the big rows array), filled one plane at a
    # time: 3 strided copies run about 3x faster than numpy's copy of the whole channels-last transpose
    images = np.empty((len(rows), 32 * 32, 3), np.uint8)
    for c in range(3):
        images[:, :, c] = rows[:, c * 1024 : (c + 1) * 1024]
    return images.reshape(len(rows), 32, 32, 3)


def read_batch(
    path: Path,
    batch: dict,
    *,
    labels_key: bytes,
    num_classes: int,
    coarse_labels_key: bytes | None = None,
    num_superclasses: int = 0,
) -> Batch:
    """Check one batch, ``batch`` as unpickled from ``path``: b'data', its labels and b'filenames'."""
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"{path}: b'data' should be an (N, {ROW_BYTES}) array, found {shape}")
    if data.dtype != np.uint8:
        in_range = data.dtype.kind in "iu" and (
            data.size == 0 or (data.min() >= 0 and data.max() <= 255)
        )
        if not in_range:
            raise DatasetError(f"{path}: b'data' should hold bytes 0..255, found dtype {data.dtype}")
        data = data.astype(np.uint8)
    n = len(data)
    if n == 0:
        raise DatasetError(f"{path} holds no images (an empty batch): re-extract or re-download it")
    labels = _labels(batch, labels_key, n, num_classes, path)
    coarse = None
    if coarse_labels_key is not None:
        coarse = _labels(batch, coarse_labels_key, n, num_superclasses, path)

    filenames = batch.get(b"filenames")
    if filenames is None:  # custom CIFAR-format sets may leave them out
        refs = [f"{path.name}/{i}" for i in range(n)]
    elif isinstance(filenames, (list, tuple)) and len(filenames) == n:
        refs = [_text(f, path) for f in filenames]
    else:
        raise DatasetError(f"{path}: b'filenames' should list {n} names")
    return Batch(data, labels, coarse, refs)


def read_names(meta: dict, key: bytes, path: Path, *, count: int | None = None) -> tuple[str, ...]:
    """Class names from the meta file, decoded from bytes: ``count`` of them (when given), all different."""
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{path}: no list of names under {key!r}")
    if count is not None and len(names) != count:
        raise DatasetError(f"{path}: {key!r} lists {len(names)} names, but this data set has {count} labels")
    out = tuple(_text(name, path) for name in names)
    repeated = sorted({n for n in out if out.count(n) > 1}) if len(set(out)) != len(out) else []
    if repeated:
        raise DatasetError(f"{path}: {key!r} names {repeated[0]!r} more than once; each label needs its own name")
    return out


def fine_to_coarse(
    labels: np.ndarray,
    coarse: np.ndarray,
    class_names: tuple[str, ...],
    superclass_names: tuple[str, ...],
    where: Path,
) -> np.ndarray:
    """fine class -> superclass as seen in the data; -1 for classes without images."""
    mapping = np.full(len(class_names), -1, dtype=np.int64)
    mapping[labels] = coarse  # for repeated classes the last pair wins; conflicts checked below
    conflict = np.flatnonzero(mapping[labels] != coarse)
    if conflict.size:
        i = conflict[0]
        fine, one, two = labels[i], coarse[i], mapping[labels[i]]
        raise DatasetError(
            f"{where}: class {class_names[fine]} appears under two superclasses, "
            f"{superclass_names[one]} and {superclass_names[two]}; the labels are inconsistent"
        )
    return mapping


def _labels(batch: dict, key: bytes, n: int, num_names: int, path: Path) -> np.ndarray:
    if key not in batch:
        raise DatasetError(f"{path}: no {key!r} in the pickle; is it a CIFAR batch of this data set?")
    raw = batch[key]
    if isinstance(raw, (list, tuple)):  # the real files: a list of ints; anything nested or odd is refused here
        if not all(type(v) is int and -(2**63) <= v < 2**63 for v in raw):
            raise DatasetError(f"{path}: {key!r} should be {n} integers, found other values in the list")
        values = np.array(raw, dtype=np.int64)
    elif isinstance(raw, np.ndarray):
        values = raw
    else:
        raise DatasetError(f"{path}: {key!r} should be {n} integers, found {type(raw).__name__}")
    if values.size == 0:
        values = values.astype(np.int64)
    if values.ndim != 1 or len(values) != n or values.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {key!r} should be {n} integers, found shape {values.shape}")
    if n and (values.min() < 0 or values.max() >= num_names):
        raise DatasetError(f"{path}: {key!r} has labels outside 0..{num_names - 1}")
    return values.astype(np.int64)


def _text(value: Any, path: Path) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise DatasetError(f"{path}: expected a name as bytes, found {type(value).__name__}")
