"""Image folders: walk a tree, decode safely, read sidecar captions.

Walking is cheap (names and ``stat`` only); decoding happens later, for the files that need embedding.
Every decode goes through :func:`decode_image`, which reads the header first and refuses an image whose
width x height is over the pixel limit *before* any pixel is decoded, so a decompression bomb (a few
bytes of PNG claiming 100 000 x 100 000 pixels) costs microseconds, never memory. Anything PIL cannot read
(corrupt, truncated, not an image) raises :class:`ImageSkipped` with a short reason; callers count it and
carry on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from cliplens.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# PIL plugins allowed to open a file: the formats above (MPO: multi-picture camera JPEGs, in older Pillows).
PIL_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_MEGAPIXELS = 100.0
SIDECAR_MAX_BYTES = 1 << 20  # a caption file larger than 1 MiB is not a caption
_CHUNK = 1 << 20


class ImageSkipped(Exception):
    """One file cannot be used (unreadable, truncated, too large); ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ImageTooLarge(ImageSkipped):
    """The header claims more pixels than the limit allows; nothing was decoded."""


@dataclass(frozen=True)
class FolderFile:
    rel: str  # path relative to the root, with forward slashes
    size: int  # bytes
    mtime_ns: int


# --------------------------------------------------------------------------- walking


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    # A pattern matches the relative path ("raw/*", "*.png") or the bare name ("Thumbs.db", "*_small.jpg").
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk_folder(root: str | Path, *, exclude: Iterable[str] = (), include_hidden: bool = False) -> list[FolderFile]:
    """Every image file under ``root`` (recursive, sorted by relative path).

    Hidden files and folders (names starting with ".") are skipped unless ``include_hidden``; ``exclude``
    globs are matched against the relative path and the file or folder name. Symbolic links to folders are
    not followed; a linked file is kept only when it resolves to a file inside ``root``, so an index never
    points outside the folder it was built from.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: pass the folder of images to index")
    real_root = root.resolve()
    patterns = tuple(exclude)
    out: list[FolderFile] = []

    def on_error(exc: OSError) -> None:
        log.warning("cannot read folder %s (%s); skipped", exc.filename, exc.strerror)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(
            d for d in dirnames
            if (include_hidden or not d.startswith(".")) and not _excluded(rel_dir + d, d, patterns)
        )
        for name in filenames:
            if not include_hidden and name.startswith("."):
                continue
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = rel_dir + name
            if _excluded(rel, name, patterns):
                continue
            path = Path(dirpath) / name
            try:
                if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                    log.warning("%s links outside %s; skipped", rel, root)
                    continue
                st = path.stat()
            except OSError as exc:
                log.warning("cannot stat %s (%s); skipped", rel, exc.strerror)
                continue
            if not os.path.isfile(path):
                continue
            out.append(FolderFile(rel=rel, size=st.st_size, mtime_ns=st.st_mtime_ns))
    out.sort(key=lambda f: f.rel)
    return out


def safe_join(root: str | Path, rel: str) -> Path:
    """``root / rel`` only if it stays inside ``root`` (after resolving links); else DatasetError."""
    root_real = Path(root).resolve()
    if not rel or rel.startswith(("/", "\\")) or "\x00" in rel:
        raise DatasetError(f"refusing path {rel!r}: not relative to the indexed folder")
    path = (root_real / rel).resolve()
    if not path.is_relative_to(root_real) or path == root_real:
        raise DatasetError(f"refusing path {rel!r}: it leaves the indexed folder")
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- decoding


def allow_pixels(max_pixels: int) -> None:
    """Make sure PIL's own bomb guard never refuses an image our limit allows.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` (89.5 MP by default) and refuses above twice that. Our limit
    (``--max-megapixels``, default 100) is checked on the header before decoding, so PIL's threshold is only
    ever raised to it, never lowered (a process-wide setting, changed in one direction only).
    """
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


def _open(source: str | Path | BinaryIO):
    """PIL image with only its header read; too-large images raise ImageTooLarge, unreadable ones ImageSkipped."""
    from PIL import Image, UnidentifiedImageError

    Image.init()  # register every plugin (once): ``formats`` names plugins that open() would load lazily
    try:
        return Image.open(source, formats=[f for f in PIL_FORMATS if f in Image.OPEN])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Over PIL's guard (the warning only arrives as an exception when warnings are errors, as in tests).
        raise ImageTooLarge("the header claims more pixels than PIL's decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise ImageSkipped("not a readable image") from None
    except FileNotFoundError:
        raise ImageSkipped("file vanished") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad headers
        raise ImageSkipped(f"bad header ({type(exc).__name__}: {exc})") from None


def probe_image(source: str | Path | BinaryIO, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header, refusing images over ``max_pixels``. Decodes nothing.

    Run single-threaded, PIL's bomb warning is silenced here (our own limit says the same thing, once).
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(source)
    with im:
        w, h = im.size
    _check_pixels(w, h, max_pixels)
    return w, h


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} is {w * h / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g}")


def decode_image(source: str | Path | BinaryIO, *, max_pixels: int):
    """Decode one image to an RGB PIL image: first frame, EXIF orientation applied, transparency on white.

    Raises ImageTooLarge (checked on the header, before decoding) or ImageSkipped; never anything else for a
    bad file.
    """
    from PIL import ImageOps

    opened = _open(source)
    try:
        w, h = opened.size
        _check_pixels(w, h, max_pixels)
        if getattr(opened, "n_frames", 1) > 1:
            opened.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
        opened.load()
        upright = ImageOps.exif_transpose(opened)  # a copy with the orientation tag applied (and removed)
        return to_rgb(upright)
    except ImageSkipped:
        raise
    except Exception as exc:  # truncated data ("image file is truncated"), broken chunks, bad EXIF...
        raise ImageSkipped(f"cannot decode ({type(exc).__name__}: {exc})") from None
    finally:
        opened.close()


def to_rgb(im):
    """``im`` as RGB (itself when it already is); transparent pixels become white (as a viewer shows them)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG/TIFF: scale to 8 bits
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB")


# --------------------------------------------------------------------------- as a BatchSource


class FolderSource:
    """BatchSource over image files; a file that fails to decode gets a blank stand-in and is recorded."""

    def __init__(self, root: Path, rels: list[str], *, max_pixels: int):
        self.root, self.rels, self.max_pixels = root, rels, max_pixels
        self.failed: dict[int, str] = {}  # position -> reason

    def __len__(self) -> int:
        return len(self.rels)

    def load(self, start: int, stop: int) -> list:
        from PIL import Image

        if not self.root.is_dir():  # e.g. a Ray worker on another machine, without the folder at this path
            import socket

            raise DatasetError(f"the image folder {self.root} is not readable on {socket.gethostname()}: with "
                               "--engine ray on a cluster, every node must see the folder at the same path")
        allow_pixels(self.max_pixels)  # PIL's guard is per process: a Ray worker's is still at PIL's default
        out = []
        for i in range(start, stop):
            try:
                out.append(decode_image(self.root / self.rels[i], max_pixels=self.max_pixels))
            except ImageSkipped as exc:
                self.failed[i] = exc.reason
                out.append(Image.new("RGB", (8, 8)))  # the indexer drops its row
        return out


# --------------------------------------------------------------------------- sidecars


def read_sidecar(image_path: str | Path) -> tuple[str | None, str | None]:
    """(caption, metadata JSON text) from ``photo.txt``/``photo.json`` or ``photo.jpg.txt``/``photo.jpg.json``.

    A ``.txt`` sidecar is the caption. A ``.json`` sidecar is kept whole as metadata, and its "caption"
    (or "title" or "description") string becomes the caption when there is no ``.txt``. Unreadable or
    oversized sidecars are ignored with a warning: a caption is never worth failing an image for.
    """
    p = Path(image_path)
    caption = meta = None
    for suffix in (".txt", ".json"):
        for cand in (p.with_suffix(suffix), p.with_name(p.name + suffix)):
            try:
                if not cand.is_file():
                    continue
                if cand.stat().st_size > SIDECAR_MAX_BYTES:
                    log.warning("sidecar %s is over %d bytes; ignored", cand.name, SIDECAR_MAX_BYTES)
                    continue
                text = cand.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("cannot read sidecar %s (%s); ignored", cand, type(exc).__name__)
                continue
            if suffix == ".txt":
                caption = caption or text or None
            else:
                try:
                    obj = json.loads(text)
                except ValueError:
                    log.warning("sidecar %s is not valid JSON; ignored", cand)
                    continue
                meta = json.dumps(obj, sort_keys=True, ensure_ascii=False)
                if isinstance(obj, dict) and caption is None:
                    for key in ("caption", "title", "description"):
                        if isinstance(obj.get(key), str) and obj[key].strip():
                            caption = obj[key].strip()
                            break
            break  # the first existing sidecar of each kind wins
    return caption, meta
