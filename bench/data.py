"""Benchmark inputs, made on the spot and seeded: CIFAR-format files, large JPEGs, queries, random vectors.

The images are smooth random colour fields plus grain (not white noise), so they decode, resize and embed
like photographs do, and their embeddings spread out enough for top-k comparisons to mean something.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

CASE_STUDIES = ("tractor", "tulip", "seal", "telephone")
OTHER_QUERIES = (
    "red car", "a dog on the beach", "mountain lake at sunrise", "bicycle", "castle", "orchid", "whale",
    "an old wooden bridge", "sunflower field", "a man riding a horse", "snowy forest", "aquarium fish",
    "skyscraper at night", "baby", "lobster on a plate", "two cats sleeping", "rocket", "maple tree in autumn",
    "a bowl of oranges", "motorcycle",
)
QUERIES = CASE_STUDIES + OTHER_QUERIES  # 24 short queries: the four case studies and 20 others


def smooth_images(n: int, size: tuple[int, int], *, seed: int = 0, grain: float = 12.0) -> np.ndarray:
    """uint8 (n, h, w, 3): a random 4x4 colour field upsampled bilinearly, plus Gaussian grain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        field = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(field).resize((w, h), Image.BILINEAR), dtype=np.float32)
        noisy = base + rng.normal(0.0, grain, (h, w, 3)).astype(np.float32)
        out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch we can extend
    """Writes str and bytes as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as cPickle did.

    Python 3's own protocol-2 output spells bytes as ``_codecs.encode(text, "latin1")`` calls;
    the real files have none, and loading them needs numpy to accept bytes dtype strings.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_python2_str
    dispatch[bytes] = _save_python2_str


def write_cifar_pickle(path: Path, obj: dict[bytes, Any]) -> None:
    """Pickle like the official files: protocol 2, Python 2 strings, numpy.core.multiarray."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # protocol 2 names globals as text lines ("c<module>\n<name>\n"), so renaming is a replace
    path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def write_cifar100(root: Path, n: int, *, seed: int = 0) -> Path:
    """A CIFAR-100-python folder (``test`` and ``meta`` pickles, the real layout) of ``n`` images; returns it."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    images = smooth_images(n, (32, 32), seed=seed)
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # 1024 red, 1024 green, 1024 blue, row-major
    rng = np.random.default_rng(seed + 1)
    fine = rng.integers(0, 100, n)
    test = {b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)], b"batch_label": b"testing batch 1 of 1",
            b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": rows}
    meta = {b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]}
    for name, obj in (("test", test), ("meta", meta)):
        write_cifar_pickle(folder / name, obj)
    return folder


def read_cifar_rows(folder: Path) -> np.ndarray:
    """What a user's script does: unpickle ``test`` and reshape the rows to uint8 (N, 32, 32, 3)."""
    with open(folder / "test", "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the benchmark's own file: trusted
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


JPEG_SIZES = ((1280, 800), (1600, 1200), (2048, 1536), (2400, 1600))  # 1.0, 1.9, 3.1, 3.8 megapixels


def write_jpegs(folder: Path, n: int = 20, *, seed: int = 0) -> list[Path]:
    """``n`` JPEGs of 1-4 megapixels (landscape and portrait), quality 90."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        if i % 3 == 2:
            w, h = h, w  # some portrait images
        small = smooth_images(1, (h // 8, w // 8), seed=seed + i, grain=6.0)[0]
        big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        grain = np.random.default_rng(seed + 1000 + i).integers(-6, 7, big.shape, dtype=np.int16)
        path = folder / f"photo_{i:02d}.jpg"
        Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def unit_vectors(n: int, dim: int, *, seed: int = 0, dtype=np.float32, chunk: int = 131072) -> np.ndarray:
    """(n, dim) random unit rows in ``dtype``, made in chunks so 1M x 512 never needs a float64 copy."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=dtype)
    for lo in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - lo), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[lo : lo + len(block)] = block
    return out
