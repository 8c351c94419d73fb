"""Thumbnails resized by libvips (cliplens.sources._vips) look like PIL's full Lanczos resize and have its exact
size, or libvips is not used: each fallback (turned off, missing, not RGB, an error, a size rounded otherwise)
is driven here and must end in PIL's own resize."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from photo_fixture import psnr, textured
from PIL import Image

from cliplens.sources import _vips, photos

pytest.importorskip("pyvips")  # the photos extra; without it PIL resizes every thumbnail


@pytest.fixture(autouse=True)
def _fresh_module(monkeypatch):
    monkeypatch.delenv("CLIPLENS_RESIZER", raising=False)
    monkeypatch.setattr(_vips, "_MODULE", None)  # each test decides again whether libvips is used


@pytest.mark.parametrize("size", [(1300, 700), (1000, 750), (640, 480), (513, 300), (700, 1300), (1530, 1020)])
def test_libvips_thumbnails_match_a_full_lanczos_resize(size):
    """Within 3x of the thumbnail (fast mode's reduced JPEGs, the 256 px from the 512 px) libvips resizes."""
    im = textured(*size)
    for target in photos.THUMB_SIZES:
        want = photos.thumb_size(*im.size, target)
        if max(s / t for s, t in zip(size, want)) >= 2 * photos.REDUCING_GAP:
            continue
        ours = _vips.lanczos(im, want, gap=photos.REDUCING_GAP)
        assert ours is not None and ours.size == want and ours.mode == "RGB"
        full = im.resize(want, Image.Resampling.LANCZOS)
        assert psnr(ours, full) >= 40.0, (size, target, psnr(ours, full))
        assert np.abs(np.asarray(ours, np.int16) - np.asarray(full, np.int16)).mean() < 1.0


def test_a_photo_3x_the_thumbnail_or_more_is_left_to_pil():
    """PIL box-reduces it and resamples the exact fraction the source covers; libvips, given the reduced image,
    rescales its whole pixels: 33 dB where PIL keeps 48 on the 1300 x 700 photo (see _vips.lanczos)."""
    assert _vips.lanczos(textured(4000, 3000), (512, 384), gap=1.5) is None
    assert _vips.lanczos(textured(1300, 700), (256, 138), gap=1.5) is None  # 5.1x
    assert _vips.lanczos(textured(1530, 1020), (512, 341), gap=1.5) is not None  # 2.99x


def test_libvips_is_what_shrink_uses_when_installed(monkeypatch):
    """shrink goes through libvips (so the path measured in docs/performance.md is the one that runs)."""
    calls = []
    real = _vips.lanczos
    monkeypatch.setattr(_vips, "lanczos", lambda im, size, **kw: calls.append(size) or real(im, size, **kw))
    im = textured(900, 600)
    big = photos.shrink(im, 512)
    assert calls == [(512, 341)] and big.size == (512, 341)
    assert photos.shrink(big, 512) is big and calls == [(512, 341)]  # already small enough: no resize at all


@pytest.mark.parametrize("size,target", [((5000, 3), 512), ((3, 5000), 512), ((2, 900), 256), ((600, 1), 256),
                                         ((257, 256), 256), ((1025, 1023), 512)])
def test_extreme_shapes_get_the_size_thumb_size_promises(size, target):
    im = textured(*size)
    want = photos.thumb_size(*size, target)
    ours = _vips.lanczos(im, want, gap=photos.REDUCING_GAP)
    within_3x = all(s < 2 * photos.REDUCING_GAP * t for s, t in zip(size, want))
    assert (ours is not None and ours.size == want) if within_3x else ours is None
    assert photos.shrink(im, target).size == want


def test_thumbnails_through_libvips_decode_as_webp_and_jpeg_of_the_right_sizes():
    small, big = photos.thumbnails(textured(1600, 1200))
    with Image.open(io.BytesIO(small)) as s, Image.open(io.BytesIO(big)) as b:
        assert (s.format, s.size) == ("WEBP", (256, 192)) and (b.format, b.size) == ("JPEG", (512, 384))


def _pil(im, target):
    return im.resize(target, Image.Resampling.LANCZOS, reducing_gap=photos.REDUCING_GAP)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPLENS_RESIZER", "pil")
    im = textured(900, 600)
    assert _vips.lanczos(im, (512, 341)) is None
    assert np.array_equal(np.asarray(photos.shrink(im, 512)), np.asarray(_pil(im, (512, 341))))


def test_missing_pyvips_falls_back_to_pil(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvips", None)  # import pyvips raises ImportError
    im = textured(900, 600)
    assert _vips.lanczos(im, (512, 341)) is None
    assert np.array_equal(np.asarray(photos.shrink(im, 512)), np.asarray(_pil(im, (512, 341))))


def test_pyvips_without_libvips_falls_back_to_pil(monkeypatch):
    class NoLibrary:  # what importing pyvips does when neither pyvips-binary nor a system libvips is there
        def __getattr__(self, name):
            raise OSError("cannot load library 'libvips.so.42'")

    monkeypatch.setitem(sys.modules, "pyvips", NoLibrary())
    assert _vips._pyvips() is False
    assert photos.shrink(textured(900, 600), 512).size == (512, 341)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16"])
def test_other_modes_are_left_to_pil(mode):
    assert _vips.lanczos(textured(900, 600).convert(mode), (512, 341)) is None


def test_a_libvips_error_falls_back_to_pil(monkeypatch):
    import pyvips

    def broken(*args, **kwargs):
        raise pyvips.Error("injected: out of memory")

    monkeypatch.setattr(pyvips.Image, "new_from_memory", staticmethod(broken))
    im = textured(900, 600)
    assert _vips.lanczos(im, (512, 341)) is None
    assert np.array_equal(np.asarray(photos.shrink(im, 512)), np.asarray(_pil(im, (512, 341))))


def test_a_size_libvips_rounds_otherwise_falls_back_to_pil(monkeypatch):
    import pyvips

    real = pyvips.Image.resize

    def one_short(self, scale, **kwargs):
        out = real(self, scale, **kwargs)
        return out.crop(0, 0, out.width - 1, out.height)

    monkeypatch.setattr(pyvips.Image, "resize", one_short)
    im = textured(900, 600)
    assert _vips.lanczos(im, (512, 341)) is None
    assert photos.shrink(im, 512).size == (512, 341)
