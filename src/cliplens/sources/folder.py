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
import functools
import hashlib
import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from cliplens.sources._fs import display_name, open_regular
from cliplens.sources.sidecars import SIDECAR_MAX_BYTES, read_sidecar, sidecar_names  # noqa: F401 (re-exported)
from cliplens.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif")
HEIF_EXTENSIONS = (".heic", ".heif")  # read through pillow-heif (the photos extra)
# Image files cliplens cannot read: counted as skipped ("unsupported .cr2"), never passed over in silence.
UNSUPPORTED_EXTENSIONS = (".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2", ".raf",
                          ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".psd", ".psb", ".svg", ".jxl", ".ico", ".exr")
# PIL plugins allowed to open a file: the formats above (MPO: multi-picture camera JPEGs, in older Pillows).
PIL_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
DEFAULT_MAX_MEGAPIXELS = 100.0
FRESH_THUMB_BYTES = 64 << 20  # thumbnails made while embedding, held until the index is written
_ORIENTATION = 0x0112  # the EXIF orientation tag
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


def walk_folder(root: str | Path, *, exclude: Iterable[str] = (), include_hidden: bool = False,
                skipped: list[tuple[str, str]] | None = None) -> list[FolderFile]:
    """Every image file under ``root`` (recursive, sorted by relative path).

    Hidden files and folders (names starting with ".") are skipped unless ``include_hidden``; ``exclude``
    globs are matched against the relative path and the file or folder name. Symbolic links to folders are
    not followed; a linked file is kept only when it resolves to a file inside ``root``, so an index never
    points outside the folder it was built from. A cliplens index folder inside ``root`` is never walked. Image
    files that cannot be used (a link loop, a link out of the folder, a name that is not valid UTF-8, a file gone
    before its ``stat``) are appended to ``skipped`` as (printable relative path, reason) when a list is given.
    """
    from cliplens.layout import holds_index

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
            and not holds_index(Path(dirpath) / d)
        )
        for name in filenames:
            if not include_hidden and name.startswith("."):
                continue
            lower = name.lower()
            unsupported = lower.endswith(UNSUPPORTED_EXTENSIONS) or (lower.endswith(HEIF_EXTENSIONS)
                                                                      and not heif_available())
            if not unsupported and not lower.endswith(IMAGE_EXTENSIONS):
                continue  # not an image (sidecars, documents): not ours to count
            rel = rel_dir + name
            if _excluded(rel, name, patterns):
                continue
            if unsupported:
                ext = "." + lower.rsplit(".", 1)[-1]
                hint = " (pip install 'cliplens[photos]')" if lower.endswith(HEIF_EXTENSIONS) else ""
                if skipped is None:
                    log.warning("%s: unsupported %s%s; skipped", display_name(rel), ext, hint)
                else:
                    skipped.append((display_name(rel), f"unsupported {ext}{hint}"))
                continue
            path = Path(dirpath) / name
            reason = None
            try:
                rel.encode("utf-8")
                if path.is_symlink() and not path.resolve(strict=True).is_relative_to(real_root):
                    reason = "a link to outside the folder"
                else:
                    st = path.stat()
                    if not stat.S_ISREG(st.st_mode):
                        reason = "not a regular file (a FIFO, socket or device)"
            except UnicodeEncodeError:
                reason = "the name is not valid UTF-8 (rename the file)"
            except RuntimeError:  # Python < 3.13: resolve() raises this for a link loop
                reason = "a symbolic link loop"
            except OSError as exc:  # ELOOP, ENOENT (gone, or a dangling link), EACCES...
                reason = f"cannot stat ({exc.strerror or type(exc).__name__})"
            if reason is not None:
                if skipped is None:
                    log.warning("%s: %s; skipped", display_name(rel), reason)
                else:  # the caller reports it with the other skipped files
                    skipped.append((display_name(rel), reason))
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


def sha256_file(path: str | Path, *, root: str | Path | None = None) -> str:
    h = hashlib.sha256()
    with open_regular(path, root=root) as f:
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


@functools.lru_cache(maxsize=1)
def heif_available() -> bool:
    """True when HEIC/HEIF files can be read: pillow-heif (the photos extra) is installed; registers its opener."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _open(source: str | Path | BinaryIO):
    """PIL image with only its header read; too-large images raise ImageTooLarge, unreadable ones ImageSkipped."""
    from PIL import Image, UnidentifiedImageError

    Image.init()  # register every plugin (once): ``formats`` names plugins that open() would load lazily
    heif_available()
    try:
        return Image.open(source, formats=[f for f in PIL_FORMATS if f in Image.OPEN])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
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


DECODE_BLOCK = 1 << 22  # bytes of compressed data per call into PIL's decoder (see decode_image_exif)


def decode_image(source: str | Path | BinaryIO, *, max_pixels: int, reduce_to: int | None = None):
    """Decode one image to an RGB PIL image: first frame, EXIF orientation applied, transparency on white.

    ``reduce_to`` (previews, and embedding in fast mode only: it changes pixels): decode a JPEG at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps both sides at least ``reduce_to`` px, so a 9000 x 9000 photo costs
    1125 x 1125 pixels of memory instead of 81 million. Other formats decode at full size (within the pixel
    limit) and are shrunk right after.

    Raises ImageTooLarge (checked on the header, before decoding) or ImageSkipped; never anything else for a
    bad file.
    """
    return decode_image_exif(source, max_pixels=max_pixels, reduce_to=reduce_to)[0]


def decode_image_exif(source: str | Path | BinaryIO, *, max_pixels: int, reduce_to: int | None = None):
    """(RGB image as :func:`decode_image` returns it, the file's EXIF, (width, height) as stored in the file).

    The EXIF comes from the same read, after decoding: a PNG keeps its eXIf chunk wherever it lies, and the
    photo metadata (cliplens.sources.photos) needs no second open of the file.
    """
    from PIL import Image, ImageOps

    from cliplens.sources import _codecs

    opened = _open(source)
    try:
        w, h = opened.size
        _check_pixels(w, h, max_pixels)
        if getattr(opened, "n_frames", 1) > 1:
            opened.seek(0)  # animated GIF/WebP, multi-page TIFF: the first frame
        decoded = None if opened.format in ("JPEG", "MPO") else _codecs.decode(opened)  # plain PNG, WebP
        if decoded is not None:
            exif = Image.Image.getexif(opened)  # complete at open: no metadata chunk follows the pixels
        else:
            if reduce_to is not None and opened.format in ("JPEG", "MPO"):
                opened.draft("RGB", (reduce_to, reduce_to))  # square request: the same whatever the EXIF rotation
            # PIL feeds its decoder 64 KiB at a time, taking the GIL back between pieces: with other Python threads
            # busy (the model, a model loading) each piece waits a switch interval (5 ms), and a 12 MP JPEG's 50
            # pieces measured 4x slower than alone. 4 MiB pieces: a photo decodes in one or two calls without the GIL.
            opened.decodermaxblock = DECODE_BLOCK
            opened.load()
            exif = opened.getexif()  # parsed once; a PNG's eXIf chunk is known now that the data is read
            decoded = opened
        im = decoded
        if reduce_to is not None and min(im.size) >= 2 * reduce_to:  # PNG, WebP...: box-reduce at once
            im = im.reduce(min(im.size) // reduce_to)
        if exif.get(_ORIENTATION, 1) not in (1, None):
            im = ImageOps.exif_transpose(im)  # a rotated copy (without the tag); only when there is a rotation
        rgb = to_rgb(im)  # itself when already RGB: no second full-size copy
        if rgb is opened and getattr(opened, "n_frames", 1) > 1:
            rgb = opened.copy()  # a multi-frame file (APNG) keeps its file open for seeking: detach, then close
        for used in {id(x): x for x in (opened, decoded, im)}.values():
            if used is not rgb:
                used.close()  # the pixels live on in ``rgb``; free the rest now, not at garbage collection
        return rgb, exif, (w, h)
    except ImageSkipped:
        opened.close()
        raise
    except Exception as exc:  # truncated data ("image file is truncated"), broken chunks, bad EXIF...
        opened.close()
        raise ImageSkipped(f"cannot decode ({type(exc).__name__}: {exc})") from None


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
    """BatchSource over image files; a file that fails to decode gets a blank stand-in and is recorded.

    ``load`` returns a :class:`DecodedImages` sequence that decodes while it is iterated, one file at a time,
    and frees each full-size image when the next one is asked for: the preprocessing that consumes it keeps
    only 224 x 224 pixels per image. Memory per decoding thread is therefore one full-size image (3 bytes a
    pixel for RGB, up to about 8 during an RGBA or EXIF-rotation conversion), however large the batch; the
    pixel limit bounds that image. In exact mode the decode is full size, because the exact path must equal
    open_clip's transform (a bicubic resize of the whole image); ``reduce_to`` (``--precision fast``) decodes
    JPEGs at a reduced DCT scale instead, which changes the pixels slightly and costs a fraction of the memory.
    """

    def __init__(self, root: Path, rels: list[str], *, max_pixels: int, thumbs: dict | None = None,
                 reduce_to: int | None = None):
        self.root, self.rels, self.max_pixels = root, rels, max_pixels
        # fast mode only (it changes pixels): JPEGs decoded at a reduced DCT scale, both sides >= reduce_to
        self.reduce_to = reduce_to
        self.failed: dict[int, str] = {}  # position -> reason
        # position -> (metadata, 256 px WebP, 512 px WebP), made from the image decoded here anyway
        # (cliplens.sources.photos): the index's thumbnails and metadata then need no second read of the file.
        # None: not asked for (a Ray worker's copy, say).
        # Kept in memory up to FRESH_THUMB_BYTES (about 1,500 photos); later ones are decoded again when written.
        self.thumbs, self._thumb_bytes = thumbs, 0

    def __len__(self) -> int:
        return len(self.rels)

    def load(self, start: int, stop: int) -> "DecodedImages":
        if not self.root.is_dir():  # e.g. a Ray worker on another machine, without the folder at this path
            import socket

            raise DatasetError(f"the image folder {self.root} is not readable on {socket.gethostname()}: with "
                               "--engine ray on a cluster, every node must see the folder at the same path")
        allow_pixels(self.max_pixels)  # PIL's guard is per process: a Ray worker's is still at PIL's default
        return DecodedImages(self, range(start, stop))

    def decode(self, i: int):
        """Image ``i`` as RGB, or an 8 x 8 black stand-in (the indexer drops its row) with the reason recorded."""
        from PIL import Image

        try:
            with open_regular(self.root / self.rels[i], root=self.root) as f:
                mtime_ns = os.fstat(f.fileno()).st_mtime_ns
                rgb, exif, size = decode_image_exif(f, max_pixels=self.max_pixels, reduce_to=self.reduce_to)
            if self.thumbs is not None and self._thumb_bytes < FRESH_THUMB_BYTES:
                from cliplens.sources.photos import meta_from_exif, thumbnails

                small, big = thumbnails(rgb)  # from the image decoded here: no second decode
                self.thumbs[i] = (meta_from_exif(exif, size, mtime_ns), small, big)
                self._thumb_bytes += len(small) + len(big)
            return rgb
        except ImageSkipped as exc:
            self.failed[i] = exc.reason
        except OSError as exc:  # gone, swapped for a FIFO or a link out of the folder since it was listed
            self.failed[i] = f"cannot read ({exc.strerror or type(exc).__name__})"
        return Image.new("RGB", (8, 8))


class DecodedImages(Sequence):
    """Images of a FolderSource, decoded on demand; iterating closes each image when the next is decoded."""

    def __init__(self, source: FolderSource, rows: range):
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.source.decode(self.rows[k])

    def __iter__(self) -> Iterator:
        previous = None
        for i in self.rows:
            if previous is not None:
                previous.close()  # its pixels were consumed: release them before the next full-size decode
            previous = self.source.decode(i)
            yield previous
