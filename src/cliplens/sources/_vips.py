"""Thumbnails resized by libvips (pyvips, the ``photos`` extra) where it is installed; by PIL otherwise.

A library's thumbnails are two Lanczos resizes a photo (to 512 px, then 256). PIL's resampling is plain C, and
libvips' ``lanczos3`` is vectorised: on fast mode's reduced JPEG decodes (about 1,000 px) of bench/photo_library.py
it resized in 3.3 ms where PIL took 8.8, PSNR >= 54 dB to PIL's resize, and both thumbnails of a photo cost 8.9
instead of 13.5 ms (fast mode), 13.0 instead of 15.5 (exact mode, where only the 256 px step is libvips').
tests/unit/test_vips.py asserts >= 40 dB to a full Lanczos, as for PIL's own box reduction. Thumbnails have no
reference pixels to equal, so a close resize is enough; the model's pixels never come from here.

libvips is handed decoded pixels only (``new_from_memory``), never a file: its parsers see no input. Its operation
cache is off (each image is resized once) and each call runs on its caller's thread (the decoding threads already
use every core). Anything else (not RGB, a photo 3x the thumbnail or more, a size libvips rounds otherwise, an
error) returns None and PIL resizes instead. ``CLIPLENS_RESIZER=pil`` turns this off.
"""

from __future__ import annotations

import os

_MODULE = None  # pyvips, once imported; False when it is missing, cannot load libvips, or is turned off


def _pyvips():
    global _MODULE
    if _MODULE is None:
        _MODULE = False
        if os.environ.get("CLIPLENS_RESIZER", "").strip().lower() != "pil":
            os.environ.setdefault("VIPS_CONCURRENCY", "1")  # read when libvips starts: one worker per call
            try:
                import pyvips

                pyvips.cache_set_max(0)
                if hasattr(pyvips, "concurrency_set"):
                    pyvips.concurrency_set(1)
                _MODULE = pyvips
            except (ImportError, OSError, AttributeError):  # no pyvips, or pyvips without a libvips to load
                pass
    return _MODULE


def lanczos(im, size: tuple[int, int], *, gap: float = 1.5):
    """``im`` (an RGB PIL image) resized to ``size`` by libvips' lanczos3, or None where libvips does not do it.
    An image ``2 * gap`` times the size or more on a side (3x for thumbnails) is left to PIL's resize with
    ``reducing_gap=gap``, which places it better:

    PIL box-reduces such an image by a whole factor first and then resamples the exact fraction of the reduced
    image that the source covers; libvips cannot be told that fraction (it rescales the reduced image's whole
    pixels), which on a 1300 x 700 photo shifted its 256 px thumbnail by up to 0.4 px (PSNR 33 dB to a full
    Lanczos). libvips' own box reduction of a large photo was no faster than PIL's, plus a 36 MB copy at 12 MP.
    """
    vips = _pyvips()
    (w, h), (tw, th) = im.size, size
    if not vips or im.mode != "RGB" or w >= 2 * gap * tw or h >= 2 * gap * th:
        return None
    from PIL import Image

    try:
        src = vips.Image.new_from_memory(im.tobytes(), w, h, 3, "uchar")
        out = src.resize(tw / w, vscale=th / h, kernel="lanczos3")
        if (out.width, out.height) != (tw, th) or out.bands != 3 or out.format != "uchar":
            return None
        return Image.frombytes("RGB", (tw, th), out.write_to_memory())
    except vips.Error:
        return None
