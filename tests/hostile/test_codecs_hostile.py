"""Damaged PNG and WebP files through imagecodecs' decoding (cliplens.sources._codecs): each ends as it did with
PIL alone, with the same pixels or the same ImageSkipped / ImageTooLarge, never another exception and never
pixels PIL would not give. New case = one line in CASES."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cliplens.sources import _codecs
from cliplens.sources.folder import ImageSkipped, ImageTooLarge, decode_image_exif

pytest.importorskip("imagecodecs")

RNG = np.random.default_rng(0)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buf, format="WEBP", quality=80)
    return buf.getvalue()


def _idat(data: bytes) -> int:
    return data.index(b"IDAT")


def _bad_idat_crc(data: bytes) -> bytes:
    i = _idat(data)
    (length,) = struct.unpack(">I", data[i - 4:i])
    crc = i + 4 + length
    return data[:crc] + bytes(b ^ 0xFF for b in data[crc:crc + 4]) + data[crc + 4:]


def _garbage_idat(data: bytes) -> bytes:  # a valid layout whose compressed pixels are noise
    i = _idat(data)
    (length,) = struct.unpack(">I", data[i - 4:i])
    noise = RNG.integers(0, 256, length, dtype=np.uint8).tobytes()
    body = b"IDAT" + noise
    return data[:i] + body + struct.pack(">I", zlib.crc32(body)) + data[i + 4 + length + 4:]


def _short_idat(data: bytes) -> bytes:  # the pixels' zlib stream ends early, the layout stays whole
    i = _idat(data)
    (length,) = struct.unpack(">I", data[i - 4:i])
    raw = zlib.decompress(data[i + 4:i + 4 + length])
    body = b"IDAT" + zlib.compress(raw[:len(raw) // 2])
    return data[:i - 4] + struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body)) \
        + data[i + 4 + length + 4:]


def _padded(data: bytes) -> bytes:  # 3 MB of junk after IEND: larger than plain pixels could need
    return data + b"\x00" * (3 << 20)


CASES = {
    "png truncated in its pixels": lambda: _png()[:-40],
    "png without IEND": lambda: _png()[:-12],
    "png with a wrong IDAT checksum": lambda: _bad_idat_crc(_png()),
    "png whose pixel data is noise": lambda: _garbage_idat(_png()),
    "png whose pixel data ends early": lambda: _short_idat(_png()),
    "png with megabytes after IEND": lambda: _padded(_png()),
    "png claiming 60000 x 60000": lambda: _png()[:16] + struct.pack(">II", 60000, 60000) + _png()[24:],
    "webp truncated": lambda: _webp()[:-30],
    "webp with a wrong RIFF size": lambda: _webp()[:4] + struct.pack("<I", 1 << 30) + _webp()[8:],
    "webp with its bitstream zeroed": lambda: _webp()[:40] + bytes(len(_webp()) - 40),
}


def _outcome(data: bytes):
    try:
        rgb, exif, size = decode_image_exif(io.BytesIO(data), max_pixels=10**8)
        return "ok", np.asarray(rgb).copy(), size
    except (ImageSkipped, ImageTooLarge) as exc:
        return type(exc).__name__, str(exc), None


@pytest.mark.parametrize("name", CASES)
def test_damaged_files_end_as_they_do_with_pil(name, monkeypatch):
    data = CASES[name]()
    results = []
    for mode in ("pil", "auto"):
        monkeypatch.setenv("CLIPLENS_DECODER", mode)
        monkeypatch.setattr(_codecs, "_MODULE", None)
        results.append(_outcome(data))
    (kind_pil, what_pil, size_pil), (kind, what, size) = results
    assert kind == kind_pil, (results[0][0], results[1][0])
    if kind == "ok":
        assert size == size_pil and np.array_equal(what, what_pil)
    else:
        assert what == what_pil
