"""Item images for the web page, served by item id only.

CIFAR-style indexes store their 32 px images in ``images.npy``: those are enlarged with nearest-neighbour
(whole-pixel blocks, as a person expects to see a tiny image). Folder indexes keep relative paths: the file is
joined to the indexed root and refused if the result leaves it (a tampered ``items.parquet`` cannot make the
server read /etc/passwd), decoded with the same safety limits as indexing and shrunk to a thumbnail.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

import numpy as np

from cliplens.sources.folder import DEFAULT_MAX_MEGAPIXELS, ImageSkipped, decode_image, open_regular, safe_join
from cliplens.errors import DatasetError

THUMB_SIZES = (64, 128, 256, 512, 1024, 2048)  # 1024 and 2048: the viewer, from the original
# Decodes in flight at once. A PNG (which has no reduced decode) costs its full size while decoding, so this
# bounds the server's image memory at about this many images at the pixel limit; JPEGs cost 1/64 of that.
_DECODES = threading.BoundedSemaphore(2)


class ImageNotAvailable(Exception):
    """The item exists but its image cannot be shown; the message says why."""


class ThumbnailCache:
    """Encoded thumbnails by (index, id, size), least recently used dropped first, at most ``max_bytes``."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._bytes = 0
        self._data: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[bytes, str] | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple, value: tuple[bytes, str]) -> None:
        with self._lock:
            old = self._data.pop(key, None)
            self._bytes += len(value[0]) - (len(old[0]) if old else 0)
            self._data[key] = value
            while self._bytes > self.max_bytes and len(self._data) > 1:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped[0])


def item_image(store, item_id: int, size: int) -> tuple[bytes, str]:
    """(encoded bytes, media type) of item ``item_id`` at most ``size`` px on its longer side."""
    from PIL import Image

    images = store.images()
    if images is not None:
        tile = np.asarray(images[item_id])
        scale = max(1, size // max(tile.shape[:2]))
        big = tile.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour enlargement
        return _encode(Image.fromarray(big), "PNG")
    if size <= 512 and getattr(store, "has_thumbnails", False):  # stored when indexed: no decoding of the photo
        data = store.thumbnail(item_id, size)
        if data and size >= 256:
            from cliplens.sources.photos import media_type

            return data, media_type(data)  # 256 px WebP, 512 px JPEG (WebP in generations before)
        if data:  # smaller than the smallest stored size: shrink the 256 px thumbnail
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size), Image.Resampling.LANCZOS)
                return _encode(im, "WEBP")
    source, path = original_path(store, item_id)
    max_pixels = int(float(source.options.get("max_megapixels") or DEFAULT_MAX_MEGAPIXELS) * 1_000_000)
    with _DECODES:  # at most this many images decoding at once, whatever the number of requests
        try:
            with open_regular(path, root=source.root) as f:
                # JPEGs decode at a reduced DCT scale, never full size: twice the thumbnail keeps LANCZOS sharp
                im = decode_image(f, max_pixels=max_pixels, reduce_to=2 * size)
        except ImageSkipped as exc:
            raise ImageNotAvailable(f"cannot show item {item_id}: {exc.reason}") from None
        except OSError as exc:
            raise ImageNotAvailable(f"cannot show item {item_id}: cannot read it ({exc.strerror})") from None
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        return _encode(im, "JPEG")


def original_path(store, item_id: int):
    """(source info, path) of item ``item_id``'s own file: only an indexed item of a folder or list source, only
    inside the indexed folder (links resolved), only a regular file; else ImageNotAvailable."""
    source = store.manifest.source
    if source is None or source.type not in ("folder", "list") or "path" not in store.items:
        raise ImageNotAvailable(f"index {store.root.name} stores no images to show")
    rel = str(store.items["path"][item_id])
    try:
        path = safe_join(source.root, rel)
    except DatasetError as exc:
        raise ImageNotAvailable(str(exc)) from None
    if not path.is_file():
        raise ImageNotAvailable(f"the image file of item {item_id} is gone; run `cliplens index` on the folder again")
    return source, path


MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
               ".avif": "image/avif", ".heic": "image/heic", ".heif": "image/heif"}
MAX_ORIGINAL_BYTES = 1 << 30


def original_file(store, item_id: int):
    """(open binary file, media type, file name, size) of item ``item_id``'s own file (see :func:`original_path`);
    the file is opened here, checked on its descriptor, so a swap after the check cannot serve another file."""
    source, path = original_path(store, item_id)
    try:
        f = open_regular(path, root=source.root, max_bytes=MAX_ORIGINAL_BYTES)
    except OSError as exc:
        raise ImageNotAvailable(f"cannot read item {item_id}'s file ({exc.strerror or type(exc).__name__})") from None
    size = os.fstat(f.fileno()).st_size
    return f, MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"), path.name, size


def _encode(im, fmt: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue(), {"PNG": "image/png", "WEBP": "image/webp"}.get(fmt, "image/jpeg")
