"""What a photo library needs besides the vectors: metadata to filter and sort by, and thumbnails to show.

For every file of a folder or list source the indexer stores (as ``items.parquet`` columns):

    taken        "2023-06-14T18:02:11": EXIF DateTimeOriginal (else DateTimeDigitized, else DateTime), local
                 camera time as EXIF records it; without EXIF, the file's mtime in local time
    taken_from   "exif" or "mtime": which of the two ``taken`` is
    camera       "Apple iPhone 13" (EXIF Make and Model), or None
    lat, lon     GPS position in degrees (EXIF GPS IFD), or None
    width, height  the image as shown (EXIF orientation applied)

and two thumbnails, long side 256 px as WebP and 512 px as JPEG (aspect kept, never enlarged), appended to the
generation's ``thumbs.bin``; the columns ``thumb_offset``, ``thumb_256`` and ``thumb_512`` say where each is
(``thumb_512`` is 0 when the image is no larger than 256 px: the one thumbnail serves both sizes). Thumbnails decode
JPEGs reduced (``draft``) so a 12 MP photo costs about 1 MP of memory; metadata reads the header only.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

from cliplens.writer import THUMBS  # noqa: E402,F401  (the file's name, where the store reads it)

THUMB_SIZES = (256, 512)
META_COLUMNS = ("taken", "taken_from", "camera", "lat", "lon", "width", "height")
THUMB_COLUMNS = ("thumb_offset", "thumb_256", "thumb_512")
WEBP_QUALITY = 80
# Measured on 80 photos of 0.3-12 MP (both thumbnails, after resizing): method 1 costs about 3 ms a photo more than
# method 0 and writes 10 % less; method 2 costs about 10 ms more again for another 10 % (method 4: 35 % slower
# than 2 at 512 px, within 3 % of its size).
WEBP_METHOD = 1
# The 512 px one, the grid's high-density and preview size, is a JPEG: 0.6 ms to encode
# against WebP's 5.5 ms (method 1; 100 photos of 0.3-12 MP), for 29 % more bytes (36 KB against 28 KB, 80 of them).
# Generations written before hold WebP at both sizes: readers tell the two apart by their bytes (media_type).
JPEG_QUALITY = 85
REDUCING_GAP = 1.5  # box-reduce until the Lanczos step shrinks by at most 1.5x (PIL's resize(reducing_gap=))

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATE_ORIGINAL, _DATE_DIGITIZED, _DATE_TIME = 0x9003, 0x9004, 0x0132
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(ch for ch in value if ch.isprintable()).strip()
    return value or None


def _exif_time(value) -> str | None:
    """EXIF "2023:06:14 18:02:11" -> "2023-06-14T18:02:11"; None when it is not a real date."""
    text = _text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S").isoformat(timespec="seconds")
    except ValueError:
        return None


def _degrees(dms, ref) -> float | None:
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if _text(ref) in ("S", "W"):
        value = -value
    return round(value, 7) if -180 <= value <= 180 else None


def camera_name(make, model) -> str | None:
    """"Apple iPhone 13" from Make "Apple" and Model "iPhone 13"; the model alone when it already names the make."""
    make, model = _text(make), _text(model)
    if make and model and model.lower().startswith(make.split()[0].lower()):
        return model
    return " ".join(p for p in (make, model) if p) or None


def read_meta(im, mtime_ns: int) -> dict:
    """The metadata columns of one opened PIL image (header only)."""
    if im.format == "PNG" and "exif" not in im.info:
        # PIL's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixel data: the
        # callers that decode anyway take the EXIF from that decode instead (decode_image_exif)
        from PIL import Image

        return meta_from_exif(Image.Exif(), im.size, mtime_ns)
    return meta_from_exif(im.getexif(), im.size, mtime_ns)


def meta_from_exif(exif, size: tuple[int, int], mtime_ns: int) -> dict:
    """The metadata columns from a parsed EXIF block and the image's stored (width, height)."""
    sub = exif.get_ifd(_EXIF_IFD) if exif else {}
    taken = next((t for t in (_exif_time(sub.get(_DATE_ORIGINAL)), _exif_time(sub.get(_DATE_DIGITIZED)),
                              _exif_time(exif.get(_DATE_TIME))) if t), None)
    out = {"taken": taken, "taken_from": "exif" if taken else "mtime", "camera": camera_name(exif.get(_MAKE),
                                                                                            exif.get(_MODEL)),
           "lat": None, "lon": None}
    if taken is None:
        out["taken"] = datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds")
    gps = exif.get_ifd(_GPS_IFD) if exif else {}
    if gps:
        lat, lon = _degrees(gps.get(2), gps.get(1)), _degrees(gps.get(4), gps.get(3))
        if lat is not None and lon is not None and -90 <= lat <= 90:
            out["lat"], out["lon"] = lat, lon
    w, h = size
    if exif.get(_ORIENTATION) in (5, 6, 7, 8):  # rotated a quarter turn when shown
        w, h = h, w
    out["width"], out["height"] = int(w), int(h)
    return out


def thumb_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the long side ``size`` and the aspect kept (as PIL's ``thumbnail``); never enlarged."""
    if w <= size and h <= size:
        return w, h
    if w >= h:
        return size, max(1, round(h * size / w))
    return max(1, round(w * size / h)), size


def shrink(im, size: int):
    """``im`` with its long side at most ``size`` (itself when it already is): Lanczos by libvips where it is
    installed and ``im`` is within 3x of the size (cliplens.sources._vips, about 2.7x faster), else PIL's Lanczos
    after a box reduction."""
    from PIL import Image

    from cliplens.sources._vips import lanczos

    target = thumb_size(*im.size, size)
    if target == im.size:
        return im
    out = lanczos(im, target, gap=REDUCING_GAP)
    return out if out is not None else im.resize(target, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def media_type(data: bytes) -> str:
    """The media type of stored thumbnail bytes: WebP (every 256 px one, and 512 px ones of older generations) or
    JPEG (512 px ones)."""
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/webp"


def thumbnails(im) -> tuple[bytes, bytes]:
    """Bytes of the 256 px WebP and the 512 px JPEG (long side; aspect kept, never enlarged) of an RGB PIL image;
    an image no larger than 256 px gets its WebP twice (the writer stores it once).

    Lanczos by libvips, or by PIL from a box-reduced copy (``reducing_gap``): either measured indistinguishable
    from PIL's full Lanczos (PSNR >= 46 dB, 54 median, on bench/photo_library.py's photos), at a fraction of its
    cost on a 12 MP photo (:func:`shrink`); the 256 px one is made from the 512 px one.
    """
    small_size, big_size = THUMB_SIZES
    big = shrink(im, big_size)
    small = shrink(big, small_size)
    try:
        small_bytes = _encode(small, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
        if small.size == big.size:  # no larger than 256 px: the one thumbnail serves both sizes
            return small_bytes, small_bytes
        return small_bytes, _encode(big, "JPEG", quality=JPEG_QUALITY)
    finally:  # shrink hands back its input when it is small enough already: close only what was made here
        if small is not big and small is not im:
            small.close()
        if big is not im:
            big.close()


def _encode(im, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def header_meta(path: Path, *, root: Path, mtime_ns: int) -> dict:
    """The metadata columns from the header of ``path`` (no decoding); the file's mtime when it has no EXIF."""
    from cliplens.sources._fs import open_regular
    from cliplens.sources.folder import ImageSkipped, _open

    try:
        with open_regular(path, root=root) as f, _open(f) as im:
            return read_meta(im, mtime_ns)
    except (ImageSkipped, OSError, ValueError):
        return {"taken": datetime.fromtimestamp(mtime_ns / 1e9).isoformat(timespec="seconds"),
                "taken_from": "mtime", "camera": None, "lat": None, "lon": None, "width": None, "height": None}


def describe_file(path: Path, *, root: Path, mtime_ns: int, max_pixels: int) -> tuple[dict, bytes, bytes]:
    """(metadata, 256 px WebP, 512 px WebP) of one image file; empty thumbnails when it cannot be decoded."""
    from cliplens.sources._fs import open_regular
    from cliplens.sources.folder import ImageSkipped, decode_image_exif

    try:
        with open_regular(path, root=root) as f:
            rgb, exif, size = decode_image_exif(f, max_pixels=max_pixels, reduce_to=max(THUMB_SIZES))
        with rgb:
            small, big = thumbnails(rgb)
        return meta_from_exif(exif, size, mtime_ns), small, big
    except (ImageSkipped, OSError, ValueError) as exc:
        log.warning("no thumbnail for %s (%s)", path.name, getattr(exc, "reason", None) or type(exc).__name__)
        return header_meta(path, root=root, mtime_ns=mtime_ns), b"", b""


def build_thumbs(rows, *, root: Path, out: Path, max_pixels: int, reuse=None, fresh=None,
                 progress: bool = False) -> dict:
    """Write ``out`` (thumbs.bin) for ``rows`` [(rel, mtime_ns, sha256)] and return the metadata and thumbnail
    columns. ``reuse(sha256) -> (meta dict, small, big) | None`` gives what an earlier generation already holds
    for that content; ``fresh`` (rel -> (meta dict, small, big)) what was made while embedding: neither decodes again.
    The rest are decoded, on every core."""
    from tqdm import tqdm

    fresh = fresh or {}

    def one(row):
        rel, mtime_ns, sha = row
        known = reuse(sha) if reuse is not None else None
        if known is not None:
            return known
        if rel in fresh:
            return fresh[rel]
        return describe_file(root / rel, root=root, mtime_ns=mtime_ns, max_pixels=max_pixels)

    cols: dict[str, list] = {c: [] for c in (*META_COLUMNS, *THUMB_COLUMNS)}
    offset = 0
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        bar = tqdm(total=len(rows), desc="thumbnails", unit="img", disable=not progress, dynamic_ncols=True)
        for meta, small, big in pool.map(one, rows):  # in order; decoding runs ahead on the other threads
            for c in META_COLUMNS:
                cols[c].append(meta.get(c))
            if big == small:
                big = b""  # an image smaller than 256 px: one thumbnail serves both sizes
            f.write(small)
            f.write(big)
            cols["thumb_offset"].append(offset)
            cols["thumb_256"].append(len(small))
            cols["thumb_512"].append(len(big))
            offset += len(small) + len(big)
            bar.update(1)
        bar.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return cols


class ThumbFile:
    """Reads thumbnails out of a generation's thumbs.bin by (offset, length), without reading the rest."""

    def __init__(self, path: Path, items):
        self.path = Path(path)
        self.items = items

    def read(self, item_id: int, size: int) -> bytes | None:
        off = int(self.items["thumb_offset"][item_id])
        small = int(self.items["thumb_256"][item_id])
        big = int(self.items["thumb_512"][item_id])
        start, length = (off, small) if size <= THUMB_SIZES[0] or big == 0 else (off + small, big)
        if length <= 0:
            return None
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, start)
        return data if len(data) == length else None
