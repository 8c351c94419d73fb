"""imagecodecs' PNG and WebP decoding (cliplens.sources._codecs) gives PIL's own pixels, EXIF and sizes, or is not
used: every variant is decoded both ways through ``decode_image_exif`` and compared byte for byte, and the test says
which variants must take the imagecodecs path (so a path that silently never runs fails here)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.sources import _codecs
from cliplens.sources.folder import decode_image_exif

pytest.importorskip("imagecodecs")  # the photos extra; without it PIL decodes everything (the same pixels)

RNG = np.random.default_rng(0)
ROTATED = Image.Exif()
ROTATED[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to show


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(pixels: np.ndarray, *, colour: int, depth: int = 8, interlace: bool = False,
         before: list[tuple[bytes, bytes]] = (), after: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A PNG written by hand (filter 0 on every row), for what PIL cannot write: Adam7, 16-bit RGB, late chunks."""
    h, w = pixels.shape[:2]
    big = pixels.astype(">u2") if depth == 16 else pixels.astype(np.uint8)

    def rows(img):
        return b"".join(b"\x00" + img[y].tobytes() for y in range(img.shape[0]))

    if interlace:  # Adam7: seven passes over the grid, each a small image of its own
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(rows(big[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if big[y0::dy, x0::dx].size)
    else:
        raw = rows(big)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(_chunk(k, d) for k, d in before)
            + _chunk(b"IDAT", zlib.compress(raw)) + b"".join(_chunk(k, d) for k, d in after) + _chunk(b"IEND", b""))


def _saved(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def _rgb(h=37, w=53):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rgba(h=37, w=53):
    a = RNG.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[:5, :, 3] = 0  # fully transparent rows: white once composited
    return a


EXIF_BYTES = ROTATED.tobytes()
# name: (file bytes, whether imagecodecs must decode it)
VARIANTS = {
    "png rgb": (lambda: _saved(Image.fromarray(_rgb()), "PNG"), True),
    "png rgba": (lambda: _saved(Image.fromarray(_rgba()), "PNG"), True),
    "png rgb, eXIf before the pixels (rotated)": (lambda: _saved(Image.fromarray(_rgb()), "PNG", exif=ROTATED), True),
    "png rgb, eXIf after the pixels (rotated)": (lambda: _png(_rgb(), colour=2, after=[(b"eXIf", EXIF_BYTES[6:])]),
                                                  False),
    "png rgb, text after the pixels": (lambda: _png(_rgb(), colour=2, after=[(b"tEXt", b"Comment\x00late")]), False),
    "png rgb, text before the pixels": (lambda: _png(_rgb(), colour=2, before=[(b"tEXt", b"Comment\x00early")]),
                                        True),
    "png rgb, transparent colour (tRNS)": (lambda: _saved(Image.fromarray(_rgb()), "PNG", transparency=(1, 2, 3)),
                                           True),
    "png rgb, Adam7 interlaced": (lambda: _png(_rgb(), colour=2, interlace=True), True),
    "png rgba, Adam7 interlaced": (lambda: _png(_rgba(), colour=6, interlace=True), True),
    "png rgb 16-bit": (lambda: _png(RNG.integers(0, 65536, (19, 23, 3)), colour=2, depth=16), False),
    "png rgba 16-bit": (lambda: _png(RNG.integers(0, 65536, (19, 23, 4)), colour=6, depth=16), False),
    "png palette": (lambda: _saved(Image.fromarray(_rgb()).quantize(64), "PNG"), False),
    "png grey": (lambda: _saved(Image.fromarray(_rgb()[..., 0]), "PNG"), False),
    "png grey + alpha": (lambda: _saved(Image.fromarray(_rgba()[..., ::3], "LA"), "PNG"), False),
    "apng, two frames": (lambda: _saved(Image.fromarray(_rgb()), "PNG", save_all=True,
                                        append_images=[Image.fromarray(_rgb())]), False),
    "webp lossy rgb": (lambda: _saved(Image.fromarray(_rgb(120, 90)), "WEBP", quality=80), True),
    "webp lossless rgb": (lambda: _saved(Image.fromarray(_rgb()), "WEBP", lossless=True), True),
    "webp lossy rgba": (lambda: _saved(Image.fromarray(_rgba(64, 48)), "WEBP", quality=70), True),
    "webp lossless rgba": (lambda: _saved(Image.fromarray(_rgba()), "WEBP", lossless=True), True),
    "webp rgb with exif (rotated)": (lambda: _saved(Image.fromarray(_rgb(64, 96)), "WEBP", exif=ROTATED), True),
    "webp animated": (lambda: _saved(Image.fromarray(_rgb()), "WEBP", save_all=True,
                                     append_images=[Image.fromarray(_rgb())], duration=50), False),
}


def _both(data: bytes, monkeypatch, *, reduce_to=None, from_path: Path | None = None):
    results = []
    for mode in ("pil", "auto"):
        monkeypatch.setenv("CLIPLENS_DECODER", mode)
        monkeypatch.setattr(_codecs, "_MODULE", None)
        source = from_path if from_path is not None else io.BytesIO(data)
        rgb, exif, size = decode_image_exif(source, max_pixels=10**8, reduce_to=reduce_to)
        results.append((np.asarray(rgb).copy(), rgb.mode, dict(exif), size))
    return results


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_decodes_to_pils_pixels_exif_and_size(name, monkeypatch, tmp_path):
    build, fast = VARIANTS[name]
    data = build()
    path = tmp_path / ("x.webp" if name.startswith("webp") else "x.png")
    path.write_bytes(data)
    for source in (None, path):  # a file object (uploads) and a path (folders)
        (pil, pil_mode, pil_exif, pil_size), (ours, mode, exif, size) = _both(data, monkeypatch, from_path=source)
        assert mode == pil_mode == "RGB"
        assert ours.shape == pil.shape and np.array_equal(ours, pil)
        assert exif == pil_exif and size == pil_size
    if "rotated" in name:
        assert pil.shape[0] > pil.shape[1] and pil_exif.get(0x0112) == 6  # the rotation really applied

    monkeypatch.setattr(_codecs, "_MODULE", None)
    monkeypatch.setenv("CLIPLENS_DECODER", "auto")
    with Image.open(io.BytesIO(data)) as opened:
        decoded = _codecs.decode(opened)
    assert (decoded is not None) == fast, "imagecodecs path taken" if decoded is not None else "PIL path taken"


def test_a_reduced_decode_is_the_same_both_ways(monkeypatch):
    data = _saved(Image.fromarray(_rgb(1100, 1300)), "PNG")
    (pil, _, _, _), (ours, _, _, _) = _both(data, monkeypatch, reduce_to=512)
    assert pil.shape == (550, 650, 3) and np.array_equal(ours, pil)


def test_turned_off_or_missing_imagecodecs_means_pil(monkeypatch):
    data = _saved(Image.fromarray(_rgb()), "PNG")
    monkeypatch.setenv("CLIPLENS_DECODER", "pil")
    monkeypatch.setattr(_codecs, "_MODULE", None)
    with Image.open(io.BytesIO(data)) as opened:
        assert _codecs.decode(opened) is None
    monkeypatch.setenv("CLIPLENS_DECODER", "auto")
    monkeypatch.setattr(_codecs, "_MODULE", None)
    monkeypatch.setitem(__import__("sys").modules, "imagecodecs", None)  # import fails
    with Image.open(io.BytesIO(data)) as opened:
        assert _codecs.decode(opened) is None


@pytest.mark.parametrize("layout, plain", [
    (lambda: _png(_rgb(), colour=2), True),
    (lambda: _png(_rgb(), colour=2)[:-12], False),  # no IEND: truncated
    (lambda: _png(_rgb(), colour=2, after=[(b"zTXt", b"k\x00\x00" + zlib.compress(b"v"))]), False),
    (lambda: _png(_rgb(), colour=2, after=[(b"iTXt", b"k\x00\x00\x00\x00\x00v")]), False),
    (lambda: _png(_rgb(), colour=2, before=[(b"acTL", struct.pack(">II", 1, 0))]), False),
    (lambda: b"\x89PNG\r\n\x1a\n" + _chunk(b"IDAT", b""), False),  # no IHDR first
    (lambda: b"not a png at all, " * 3, False),
])
def test_png_layout_walk(layout, plain):
    assert _codecs.png_is_plain(layout()) is plain
