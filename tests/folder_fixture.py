"""A small image folder with real files of every supported format, and the bad files a real folder has.

Plain functions (``import folder_fixture``), seeded, written with PIL:

    a.png            RGB 64x48 noise, with a caption sidecar a.txt
    sub/b.jpg        RGB 50x40
    sub/deep/c.webp  RGB 40x40, with a JSON sidecar c.json
    d.gif            2-frame animation: frame 0 red, frame 1 green
    e.bmp, f.tiff    RGB 30x20
    g_rgba.png       RGBA, fully transparent left half
    rotated.jpg      stored 40 wide x 20 tall, left half red, right half blue, EXIF orientation 6
    corrupt.jpg      random bytes
    truncated.png    the first half of a valid PNG
    bomb.png         a valid PNG header claiming 100000 x 100000 pixels (a decompression bomb)
    .hidden.png      hidden file;  .cache/h.png  inside a hidden folder
    skipme/x.png     for --exclude tests
    notes.txt        not an image
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

GOOD = ("a.png", "d.gif", "e.bmp", "f.tiff", "g_rgba.png", "rotated.jpg", "skipme/x.png", "sub/b.jpg",
        "sub/deep/c.webp")
BAD = ("bomb.png", "corrupt.jpg", "truncated.png")
HIDDEN = (".cache/h.png", ".hidden.png")


def noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims width x height (its data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def rotated_jpeg(path: Path) -> None:
    from PIL import Image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif.tobytes())


def make_folder(root: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("sub/deep", "skipme", ".cache"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise(rng, 48, 64)).save(root / "a.png")
    (root / "a.txt").write_text("a caption for a\n")
    Image.fromarray(noise(rng, 40, 50)).save(root / "sub/b.jpg", quality=90)
    Image.fromarray(noise(rng, 40, 40)).save(root / "sub/deep/c.webp", quality=90)
    (root / "sub/deep/c.json").write_text('{"caption": "the webp one", "tags": ["x"]}')
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 255, 0))]
    frames[0].save(root / "d.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(noise(rng, 20, 30)).save(root / "e.bmp")
    Image.fromarray(noise(rng, 20, 30)).save(root / "f.tiff")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, 8:] = (0, 0, 0, 255)  # right half opaque black, left half transparent
    Image.fromarray(rgba, "RGBA").save(root / "g_rgba.png")
    rotated_jpeg(root / "rotated.jpg")
    (root / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    import io

    buf = io.BytesIO()
    Image.fromarray(noise(rng, 64, 64)).save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    Image.fromarray(noise(rng, 8, 8)).save(root / ".hidden.png")
    Image.fromarray(noise(rng, 8, 8)).save(root / ".cache/h.png")
    Image.fromarray(noise(rng, 8, 8)).save(root / "skipme/x.png")
    (root / "notes.txt").write_text("not an image")
    return root
