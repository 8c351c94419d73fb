"""PNG and WebP decoded by imagecodecs (libspng, libwebp) where it is installed and gives PIL's own pixels.

A photo library's PNGs and WebPs cannot be decoded reduced, so they cost the most per pixel: on
bench/photo_library.py's 200 photos, PIL spent 1.6-1.7 s on 29 PNGs (86 MP) and 0.65 s on 19 WebPs (63 MP); libspng
and libwebp through imagecodecs 1.2 s and 0.42 s on one thread, releasing the GIL while they work as PIL does.
Both formats are defined to the pixel (PNG is lossless; a WebP's decoded pixels are fixed by its bitstream and the
libwebp both use), so the result must equal PIL's, and it is used only where that is proven
(tests/unit/test_codecs.py compares the two paths on every variant below, byte for byte):

    PNG   8 bits per channel, RGB or RGBA, one frame (not APNG), no metadata chunk after the image data
          (PIL reads a late eXIf only by decoding), the file no larger than its pixels could need
    WebP  one frame, RGB or RGBA

Anything else (palette, grey, 16 bits, animation), or any error from imagecodecs, and PIL decodes the file as
before, so a damaged file fails, or is read, exactly as it was. ``CLIPLENS_DECODER=pil`` turns this off.
"""

from __future__ import annotations

import os
import struct

_LATE_METADATA = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}  # chunks PIL reads for getexif/XMP only at load if after IDAT
_MODULE = None  # imagecodecs, once imported; False when it is missing or turned off


def _imagecodecs():
    global _MODULE
    if _MODULE is None:
        _MODULE = False
        if os.environ.get("CLIPLENS_DECODER", "").strip().lower() != "pil":
            try:
                import imagecodecs

                imagecodecs.spng_decode, imagecodecs.webp_decode  # noqa: B018 - both present in this build
                _MODULE = imagecodecs
            except (ImportError, AttributeError):
                pass
    return _MODULE


def png_is_plain(data: bytes) -> bool:
    """True for an 8-bit RGB/RGBA PNG with one frame and no metadata chunk after its first IDAT (walks the chunk
    headers only; a malformed layout is not plain)."""
    if len(data) < 33 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    bit_depth, colour = data[24], data[25]
    if bit_depth != 8 or colour not in (2, 6):
        return False
    pos, seen_idat = 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"acTL":
            return False  # animated
        if kind == b"IDAT":
            seen_idat = True
        elif seen_idat and kind in _LATE_METADATA:
            return False
        elif kind == b"IEND":
            return seen_idat
        pos += 12 + length
    return False  # no IEND: truncated, let PIL say so


def decode(opened):
    """The pixels of ``opened`` (a PIL image, header read) as a new RGB/RGBA PIL image equal to what
    ``opened.load()`` gives, carrying its ``info`` (EXIF, XMP); or None where PIL must decode it."""
    codecs = _imagecodecs()
    if not codecs or opened.format not in ("PNG", "WEBP") or opened.mode not in ("RGB", "RGBA"):
        return None
    if getattr(opened, "n_frames", 1) != 1:
        return None
    w, h = opened.size
    data = _read_all(opened.fp, limit=8 * w * h + (1 << 20))  # larger than any plain encoding: PIL streams it
    if data is None:
        return None
    try:
        if opened.format == "PNG":
            if not png_is_plain(data):
                return None
            pixels = codecs.spng_decode(data)
        else:
            pixels = codecs.webp_decode(data)
    except Exception:  # noqa: BLE001 - whatever imagecodecs refuses, PIL decides on (and words the error)
        return None
    channels = len(opened.mode)
    if pixels.dtype.name != "uint8" or pixels.shape != (h, w, channels):
        return None
    from PIL import Image

    im = Image.fromarray(pixels, opened.mode)
    im.info = dict(opened.info)  # EXIF and XMP, as the image PIL decodes carries them
    return im


def _read_all(fp, *, limit: int) -> bytes | None:
    """The whole file behind ``fp`` (at most ``limit`` bytes, else None), its position left where it was."""
    try:
        here = fp.tell()
        try:
            size = fp.seek(0, os.SEEK_END)
            if size > limit:
                return None
            fp.seek(0)
            return fp.read(size)
        finally:
            fp.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
