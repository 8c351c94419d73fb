"""datasets/folder.py: walking, safe decoding (EXIF, frames, transparency, bombs), sidecars, safe paths."""

from __future__ import annotations

import io
import os
import time

import folder_fixture
import numpy as np
import pytest
from PIL import Image

from cliplens.sources.folder import (
    ImageSkipped,
    ImageTooLarge,
    decode_image,
    probe_image,
    read_sidecar,
    safe_join,
    walk_folder,
)
from cliplens.errors import DatasetError

BIG = 100_000_000


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return folder_fixture.make_folder(tmp_path_factory.mktemp("photos") / "photos")


def test_walk_finds_every_format_sorted_and_skips_hidden_and_non_images(photos):
    rels = [f.rel for f in walk_folder(photos)]
    assert rels == sorted(folder_fixture.GOOD + folder_fixture.BAD)
    f = next(f for f in walk_folder(photos) if f.rel == "a.png")
    st = (photos / "a.png").stat()
    assert (f.size, f.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_walk_include_hidden_and_exclude_globs(photos):
    with_hidden = {f.rel for f in walk_folder(photos, include_hidden=True)}
    assert set(folder_fixture.HIDDEN) <= with_hidden
    rels = {f.rel for f in walk_folder(photos, exclude=["skipme/*", "*.tiff", "deep"])}
    assert "skipme/x.png" not in rels and "f.tiff" not in rels and "sub/deep/c.webp" not in rels
    assert "sub/b.jpg" in rels


def test_walk_refuses_a_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        walk_folder(tmp_path / "nope")


def test_walk_skips_links_that_leave_the_folder(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    Image.new("RGB", (4, 4)).save(root / "inside.png")
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    os.symlink(root / "inside.png", root / "alias.png")
    assert [f.rel for f in walk_folder(root)] == ["alias.png", "inside.png"]


@pytest.mark.parametrize("rel,shape", [("a.png", (48, 64, 3)), ("sub/b.jpg", (40, 50, 3)),
                                       ("sub/deep/c.webp", (40, 40, 3)), ("e.bmp", (20, 30, 3)),
                                       ("f.tiff", (20, 30, 3)), ("d.gif", (16, 16, 3))])
def test_decode_every_format_to_rgb(photos, rel, shape):
    im = decode_image(photos / rel, max_pixels=BIG)
    assert im.mode == "RGB"
    assert np.asarray(im).shape == shape


def test_lossless_formats_decode_exactly(photos):
    rng = np.random.default_rng(0)
    expected = folder_fixture.noise(rng, 48, 64)  # a.png is the first image the fixture draws
    assert np.array_equal(np.asarray(decode_image(photos / "a.png", max_pixels=BIG)), expected)


def test_gif_gives_its_first_frame(photos):
    arr = np.asarray(decode_image(photos / "d.gif", max_pixels=BIG))
    assert tuple(arr[8, 8]) == (255, 0, 0)


def test_exif_orientation_is_applied(photos):
    raw = np.asarray(Image.open(photos / "rotated.jpg").convert("RGB"))
    assert raw.shape == (20, 40, 3)  # stored landscape
    arr = np.asarray(decode_image(photos / "rotated.jpg", max_pixels=BIG)).astype(int)
    assert arr.shape == (40, 20, 3)  # shown portrait: rotated 90 degrees clockwise
    top, bottom = arr[:18].mean(axis=(0, 1)), arr[22:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert np.abs(arr - np.rot90(raw, k=-1)).mean() < 3  # same as rotating by hand (JPEG noise aside)


def test_transparency_becomes_white(photos):
    arr = np.asarray(decode_image(photos / "g_rgba.png", max_pixels=BIG))
    assert tuple(arr[4, 2]) == (255, 255, 255) and tuple(arr[4, 12]) == (0, 0, 0)


@pytest.mark.parametrize("rel", ["corrupt.jpg", "truncated.png"])
def test_unreadable_files_raise_image_skipped(photos, rel):
    with pytest.raises(ImageSkipped) as info:
        decode_image(photos / rel, max_pixels=BIG)
    assert info.value.reason and not isinstance(info.value, ImageTooLarge)


def test_decompression_bomb_is_refused_from_the_header_cheaply(photos):
    t0 = time.perf_counter()
    for fn in (probe_image, decode_image):
        with pytest.raises(ImageTooLarge):
            fn(photos / "bomb.png", max_pixels=BIG)
    assert time.perf_counter() - t0 < 1.0  # 10^10 pixels would be 30 GB: nothing was decoded


def test_our_pixel_limit_is_checked_before_decoding(photos):
    assert probe_image(photos / "a.png", max_pixels=64 * 48) == (64, 48)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        probe_image(photos / "a.png", max_pixels=64 * 48 - 1)
    with pytest.raises(ImageTooLarge):
        decode_image(photos / "a.png", max_pixels=1000)
    # between PIL's own warning threshold and its hard limit: refused by ours, on the header alone
    header = folder_fixture.png_header_only(12_000, 10_000)
    with pytest.raises(ImageTooLarge):
        probe_image(io.BytesIO(header), max_pixels=BIG)
    with pytest.raises(ImageTooLarge):
        decode_image(io.BytesIO(header), max_pixels=BIG)


def test_decode_from_bytes(photos):
    data = (photos / "sub/b.jpg").read_bytes()
    assert decode_image(io.BytesIO(data), max_pixels=BIG).size == (50, 40)


def test_sidecars(photos):
    assert read_sidecar(photos / "a.png") == ("a caption for a", None)
    caption, meta = read_sidecar(photos / "sub/deep/c.webp")
    assert caption == "the webp one" and '"tags": ["x"]' in meta
    assert read_sidecar(photos / "e.bmp") == (None, None)


def test_sidecar_full_name_and_bad_json(tmp_path):
    (tmp_path / "p.jpg.txt").write_text("long form")
    (tmp_path / "p.json").write_text("{not json")
    assert read_sidecar(tmp_path / "p.jpg") == ("long form", None)


@pytest.mark.parametrize("rel", ["../secret.txt", "/etc/passwd", "sub/../../x", "", "a\x00b", "."])
def test_safe_join_refuses_paths_leaving_the_root(photos, rel):
    with pytest.raises(DatasetError):
        safe_join(photos, rel)


def test_safe_join_accepts_paths_inside(photos):
    assert safe_join(photos, "sub/b.jpg") == (photos / "sub/b.jpg").resolve()
