"""Photo metadata and thumbnails from one read of each file (cliplens.sources.photos, decode_image_exif)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from photo_fixture import psnr, textured
from PIL import Image, ImageFile

from cliplens.sources import photos
from cliplens.sources.folder import FolderSource, decode_image_exif

BIG = 10**9


def _exif(taken: str) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R6"
    exif.get_ifd(0x8769)[0x9003] = taken
    return exif.tobytes()


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def _png(chunks) -> bytes:
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def png_with_exif_after_pixels(im: Image.Image, taken: str) -> bytes:
    """A valid PNG whose eXIf chunk follows the image data (the PNG spec allows it; PIL finds it only on load)."""
    buf = io.BytesIO()
    im.save(buf, format="PNG", exif=_exif(taken))
    chunks = _png_chunks(buf.getvalue())
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][0] == b"IEND"
    return _png(rest[:-1] + exif + rest[-1:])


def test_exif_after_the_png_pixels_is_read_by_the_decode(tmp_path):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    path = tmp_path / "late.png"
    path.write_bytes(png_with_exif_after_pixels(im, "2021:05:06 07:08:09"))
    with Image.open(path) as opened:
        assert "exif" not in opened.info  # the header alone does not hold it: this file tests the late case
    rgb, exif, size = decode_image_exif(str(path), max_pixels=BIG)
    meta = photos.meta_from_exif(exif, size, 0)
    assert np.array_equal(np.asarray(rgb), np.asarray(im))
    assert meta["taken"] == "2021-05-06T07:08:09" and meta["taken_from"] == "exif"
    assert meta["camera"] == "Canon EOS R6" and (meta["width"], meta["height"]) == (40, 30)


def test_the_header_of_a_png_is_read_without_decoding_it(tmp_path, monkeypatch):
    path = tmp_path / "plain.png"
    Image.new("RGB", (300, 200), (9, 9, 9)).save(path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the header read decoded the PNG"))
    meta = photos.header_meta(path, root=tmp_path, mtime_ns=1_600_000_000 * 10**9)
    assert meta["taken_from"] == "mtime" and (meta["width"], meta["height"]) == (300, 200)


def test_indexing_keeps_metadata_from_the_decode_that_embeds(tmp_path):
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    (tmp_path / "late.png").write_bytes(png_with_exif_after_pixels(im, "2019:01:02 03:04:05"))
    im.save(tmp_path / "plain.jpg", exif=_exif("2020:02:03 04:05:06"))
    made: dict = {}
    source = FolderSource(tmp_path, ["late.png", "plain.jpg"], max_pixels=BIG, thumbs=made)
    for _ in source.load(0, 2):
        pass
    assert sorted(made) == [0, 1] and not source.failed
    assert made[0][0]["taken"] == "2019-01-02T03:04:05" and made[1][0]["taken"] == "2020-02-03T04:05:06"
    for meta, small, big in made.values():
        with Image.open(io.BytesIO(small)) as t:
            assert t.format == "WEBP" and t.size == (meta["width"], meta["height"])  # smaller than 256: as is


@pytest.mark.parametrize("size", [(4000, 3000), (2999, 4001), (1300, 700), (1000, 750)])
def test_thumbnails_match_a_full_lanczos_resize(size):
    """The box reduction before Lanczos (what makes a 12 MP thumbnail cheap), or libvips within 3x of the size
    (tests/unit/test_vips.py), is invisible: >= 40 dB PSNR."""
    w, h = size
    im = textured(w, h)
    for target in photos.THUMB_SIZES:
        ours = photos.shrink(im, target)
        full = im.resize(ours.size, Image.Resampling.LANCZOS)
        assert ours.size == photos.thumb_size(w, h, target)
        assert max(ours.size) == target and abs(ours.width / ours.height - w / h) < 0.01
        assert psnr(ours, full) >= 40.0, (size, target)


def test_thumb_size_keeps_the_aspect_and_never_enlarges():
    assert photos.thumb_size(4000, 3000, 512) == (512, 384)
    assert photos.thumb_size(3000, 4000, 256) == (192, 256)
    assert photos.thumb_size(200, 100, 256) == (200, 100)
    assert photos.thumb_size(5000, 3, 512) == (512, 1)
