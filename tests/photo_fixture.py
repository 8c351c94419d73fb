"""A photo folder written by the tests: JPEGs with EXIF dates, camera tags and GPS, a HEIC and an AVIF, a phone
photo stored rotated, one without EXIF, an unsupported RAW file and an unreadable one; plus re-encoded copies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825

# name -> (taken, make, model, (lat, lon) or None, orientation)
PHOTOS = {
    "2023/beach.jpg": ("2023:06:14 18:02:11", "Apple", "iPhone 13", (43.2965, 5.3698), 1),
    "2023/dog.jpg": ("2023:08:02 09:15:00", "Canon", "Canon EOS R6", None, 1),
    "2022/snow.jpg": ("2022:12:24 14:00:00", "FUJIFILM", "X-T4", (46.5197, 6.6323), 1),
    "2023/portrait.jpg": ("2023:07:01 12:00:00", "Apple", "iPhone 13", None, 6),  # shown rotated: 48 x 64
    "phone.heic": ("2024:01:05 08:30:00", "Apple", "iPhone 15 Pro", (40.7128, -74.006), 1),
    "web.avif": (None, None, None, None, 1),
    "scan.png": (None, None, None, None, 1),
}
UNSUPPORTED = ("raw/IMG_0001.CR2",)
UNREADABLE = ("broken.jpg",)
MTIME = 1_600_000_000  # 2020-09-13 (UTC): the date files without EXIF report


def _dms(value: float):
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60, 4)
    return (d, m, s)


def exif_for(taken, make, model, gps, orientation) -> Image.Exif:
    exif = Image.Exif()
    if make:
        exif[0x010F], exif[0x0110] = make, model
    if orientation != 1:
        exif[0x0112] = orientation
    if taken:
        exif.get_ifd(EXIF_IFD)[0x9003] = taken
    if gps:
        lat, lon = gps
        exif.get_ifd(GPS_IFD).update({1: "N" if lat >= 0 else "S", 2: _dms(lat), 3: "E" if lon >= 0 else "W",
                                      4: _dms(lon)})
    return exif


def picture(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth blocks: survives re-encoding
    return Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)


def textured(w: int, h: int, seed: int = 2) -> Image.Image:
    """Smooth colour waves with 8 px blocks of noise: edges and texture, as a photo has (thumbnail quality)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (17 + 9 * c)) * np.cos(yy / (23 + 5 * c)) for c in range(3)], -1)
    detail = rng.normal(0, 0.15, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return Image.fromarray(np.clip((base + detail + 1.2) * 100, 0, 255).astype(np.uint8))


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / max(((x - y) ** 2).mean(), 1e-12)))


def make_photos(root: Path) -> Path:
    import pillow_heif

    pillow_heif.register_heif_opener()  # the HEIC writer
    root.mkdir(parents=True, exist_ok=True)
    for i, (rel, (taken, make, model, gps, orientation)) in enumerate(sorted(PHOTOS.items())):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im = picture(i)
        exif = exif_for(taken, make, model, gps, orientation)
        fmt = {".jpg": "JPEG", ".heic": "HEIF", ".avif": "AVIF", ".png": "PNG"}[path.suffix]
        kwargs = {"exif": exif.tobytes()} if taken or make else {}
        im.save(path, format=fmt, quality=90, **kwargs)
        os.utime(path, (MTIME, MTIME))
    for rel in UNSUPPORTED:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"II*\x00CR" + b"\x00" * 64)
    for rel in UNREADABLE:
        (root / rel).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def reencoded(src: Path, dst: Path, *, scale: float = 0.75, quality: int = 70) -> None:
    """A near-identical copy: resized and saved again at another quality (what a messaging app does)."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.resize((max(8, int(im.width * scale)), max(8, int(im.height * scale))), Image.Resampling.LANCZOS
                  ).save(dst, format="JPEG", quality=quality)
