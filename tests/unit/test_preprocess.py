"""cliplens.preprocess against its references: Pillow's resize and open_clip's eval transform."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from cliplens.preprocess import (
    INTERPOLATIONS,
    ClipPreprocessConfig,
    PIL_RESIZE_ABOVE_PIXELS,
    center_crop_box,
    preprocess_batch,
    preprocess_pil,
    resize_uint8,
    resized_shape,
)

PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def pil_resize(images: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """The oracle: Image.resize((w, h)) on each (H, W, C) image, as mode L or RGB."""
    h, w = size
    out = []
    for image in images:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out.append(np.asarray(pil.resize((w, h), PIL_FILTERS[interpolation])).reshape(h, w, -1))
    return np.stack(out)


def open_clip_reference(images: np.ndarray, transform) -> np.ndarray:
    """open_clip's eval transform on each image as a PIL image, stacked as numpy."""
    pils = [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]
    return torch.stack([transform(pil) for pil in pils]).numpy()


def checkerboard(h: int, w: int, channels: int = 3) -> np.ndarray:
    """0/255 squares: bicubic and lanczos overshoot on every edge, so both clips are exercised."""
    board = ((np.indices((h, w)).sum(axis=0) % 2) * 255).astype(np.uint8)
    return np.repeat(board[..., None], channels, axis=-1)


# (H, W) -> (h, w): CIFAR, odd up- and downscales, CLIP's shortest-side sizes, and both pass
# orders Pillow 13 uses (vertical first when the height shrinks by more than twice the width).
RESIZE_CASES = [
    ((32, 32), (224, 224)),
    ((17, 45), (224, 593)),
    ((300, 200), (336, 224)),
    ((480, 640), (224, 298)),
    ((640, 480), (298, 224)),
    ((97, 101), (13, 29)),
    ((300, 60), (100, 50)),  # vertical pass first
    ((60, 300), (50, 100)),  # horizontal pass first
    ((1, 1), (5, 3)),
]


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(("in_hw", "out_hw"), RESIZE_CASES)
def test_resize_uint8_equals_pillow_on_random_batches(interpolation, in_hw, out_hw):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, *in_hw, 3), dtype=np.uint8)
    got = resize_uint8(images, out_hw, interpolation=interpolation)
    assert got.dtype == np.uint8 and got.shape == (3, *out_hw, 3)
    assert np.array_equal(got, pil_resize(images, out_hw, interpolation))


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_resize_uint8_equals_pillow_on_random_sizes(interpolation):
    rng = np.random.default_rng(0)
    for _ in range(40):
        in_hw = tuple(int(v) for v in rng.integers(1, 90, 2))
        out_hw = tuple(int(v) for v in rng.integers(1, 260, 2))
        image = rng.integers(0, 256, (1, *in_hw, 3), dtype=np.uint8)
        got = resize_uint8(image, out_hw, interpolation=interpolation)
        assert np.array_equal(got, pil_resize(image, out_hw, interpolation)), (in_hw, out_hw)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize(
    ("in_hw", "out_hw"), [((32, 32), (224, 224)), ((45, 17), (23, 9)), ((9, 40), (224, 1000))]
)
def test_resize_uint8_saturated_and_grey_images(interpolation, in_hw, out_hw):
    rng = np.random.default_rng(0)
    board = checkerboard(*in_hw, channels=1)
    noise = rng.choice(np.array([0, 255], dtype=np.uint8), (*in_hw, 1))
    images = np.stack([board, noise])  # (2, H, W, 1): mode "L" in Pillow
    got = resize_uint8(images, out_hw, interpolation=interpolation)
    assert np.array_equal(got, pil_resize(images, out_hw, interpolation))
    if out_hw[0] > in_hw[0]:  # upscaled 0/255 edges reach both ends of the range
        assert got.min() == 0 and got.max() == 255


def test_resize_uint8_clips_overshoot_like_pillow():
    board = checkerboard(32, 32)
    expected = pil_resize(board[None], (224, 224), "lanczos")[0]
    # lanczos rings past both ends on a 0/255 board, so the clip in every pass matters
    assert (expected == 0).mean() > 0.01 and (expected == 255).mean() > 0.01
    assert np.array_equal(resize_uint8(board, (224, 224), interpolation="lanczos"), expected)


def test_resize_uint8_single_image_and_unchanged_size():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    got = resize_uint8(image, (41, 30))  # (H, W, C) in, (h, w, C) out; width pass skipped
    assert got.shape == (41, 30, 3)
    assert np.array_equal(got, pil_resize(image[None], (41, 30), "bicubic")[0])
    assert np.array_equal(resize_uint8(image, (20, 30)), image)


@pytest.mark.parametrize(
    ("h", "w"), [(32, 32), (480, 640), (640, 480), (17, 45), (225, 1000), (224, 224)]
)
def test_resized_shape_and_center_crop_match_torchvision(h, w):
    image = Image.new("RGB", (w, h))
    resized = TF.resize(image, 224)
    assert resized_shape(h, w, 224) == (resized.height, resized.width)
    rh, rw = resized_shape(h, w, 224)
    grid = torch.arange(rh * rw).reshape(1, rh, rw)
    top, left = center_crop_box(rh, rw, 224)
    assert int(TF.center_crop(grid, [224, 224])[0, 0, 0]) == top * rw + left


def test_center_crop_box_rounds_half_to_even_like_torchvision():
    assert center_crop_box(225, 227, 224) == (0, 2)  # round(0.5) == 0, round(1.5) == 2


@pytest.mark.parametrize(
    "shape",
    [(8, 32, 32, 3), (2, 45, 17, 3), (2, 480, 640, 3), (2, 224, 224, 3), (3, 32, 32, 1)],
    ids=["cifar", "tall", "wide", "already-224", "grey"],
)
def test_preprocess_batch_matches_open_clip_eval_transform(shape):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[0] = checkerboard(*shape[1:3], channels=shape[3])  # clipping inside the pipeline too
    transform = open_clip.image_transform(224, is_train=False)
    got = preprocess_batch(images)
    assert got.dtype == np.float32 and got.shape == (shape[0], 3, 224, 224)
    assert got.flags.c_contiguous
    # measured 0.0 (bit-identical) with Pillow 13.0, torchvision 0.29, open_clip 3.3
    assert np.abs(got - open_clip_reference(images, transform)).max() <= 1e-6


def test_preprocess_batch_bilinear_config_and_out_argument():
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 30, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    config = ClipPreprocessConfig(size=64, mean=mean, std=std, interpolation="bilinear")
    transform = open_clip.image_transform(
        64, is_train=False, mean=mean, std=std, interpolation="bilinear"
    )
    out = np.full((4, 3, 64, 64), np.nan, dtype=np.float32)
    assert preprocess_batch(images, config, out=out) is out
    assert np.abs(out - open_clip_reference(images, transform)).max() <= 1e-6


def test_preprocess_batch_empty_batch():
    assert preprocess_batch(np.zeros((0, 32, 32, 3), dtype=np.uint8)).shape == (0, 3, 224, 224)


def _model_with(cfg: dict) -> SimpleNamespace:
    model = SimpleNamespace(visual=SimpleNamespace())
    set_model_preprocess_cfg(model, cfg)  # what open_clip's factory does to a created model
    return model


def test_config_from_open_clip_preprocess_cfg():
    mean, std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
    cfg = dict(
        size=(96, 96),
        mode="RGB",
        mean=mean,
        std=std,
        interpolation="bilinear",
        resize_mode="shortest",
        fill_color=0,
    )
    config = ClipPreprocessConfig.from_open_clip(_model_with(cfg))
    assert config == ClipPreprocessConfig(size=96, mean=mean, std=std, interpolation="bilinear")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    reference = open_clip_reference(images, transform)
    assert np.abs(preprocess_batch(images, config) - reference).max() <= 1e-6


def test_config_from_open_clip_defaults_and_legacy_attributes():
    default = _model_with(dict(size=224, mean=None, std=None, interpolation="random"))
    assert ClipPreprocessConfig.from_open_clip(default) == ClipPreprocessConfig()
    half = (0.5, 0.5, 0.5)
    visual = SimpleNamespace(image_size=160, image_mean=half, image_std=half)
    legacy = SimpleNamespace(visual=visual)
    expected = ClipPreprocessConfig(size=160, mean=half, std=half)
    assert ClipPreprocessConfig.from_open_clip(legacy) == expected


@pytest.mark.parametrize(
    "cfg",
    [
        dict(size=224, mean=None, std=None, resize_mode="longest"),
        dict(size=224, mean=None, std=None, resize_mode="squash"),
        dict(size=(224, 192), mean=None, std=None),
    ],
    ids=["longest", "squash", "non-square"],
)
def test_config_from_open_clip_refuses_what_it_cannot_reproduce(cfg):
    with pytest.raises(ValueError, match="supported"):
        ClipPreprocessConfig.from_open_clip(_model_with(cfg))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: resize_uint8(np.zeros((4, 4, 3), np.float32), (8, 8)), "uint8"),
        (lambda: resize_uint8([[0]], (8, 8)), "uint8"),
        (lambda: resize_uint8(np.zeros((4, 4), np.uint8), (8, 8)), "shape"),
        (lambda: resize_uint8(np.zeros((1, 1, 4, 4, 3), np.uint8), (8, 8)), "shape"),
        (
            lambda: resize_uint8(np.zeros((4, 4, 3), np.uint8), (8, 8), interpolation="box"),
            "bicubic, bilinear, lanczos, nearest",
        ),
        (lambda: resize_uint8(np.zeros((4, 4, 3), np.uint8), (0, 8)), "positive"),
        (lambda: resize_uint8(np.zeros((4, 4, 3), np.uint8), 8), "two positive ints"),
        (lambda: preprocess_batch(np.zeros((32, 32, 3), np.uint8)), "shape"),
        (lambda: preprocess_batch(np.zeros((1, 32, 32, 4), np.uint8)), "channels"),
        (lambda: preprocess_batch(np.zeros((1, 32, 32, 3), np.int16)), "uint8"),
        (
            lambda: preprocess_batch(
                np.zeros((1, 8, 8, 3), np.uint8), out=np.zeros((1, 3, 224, 224), np.float64)
            ),
            "out must be",
        ),
        (lambda: ClipPreprocessConfig(interpolation="hamming"), "valid names"),
        (lambda: ClipPreprocessConfig(size=0), "positive"),
        (lambda: ClipPreprocessConfig(std=(0.1, 0.0, 0.1)), "std"),
    ],
)
def test_invalid_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("size", [(2100, 1500), (1201, 2000), (640, 480)], ids=["wide-3mp", "tall-2.4mp", "small"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_preprocess_pil_is_open_clips_transform_bit_for_bit(size, interpolation):
    """The torch-free path the encoder runs on every RGB photo: Pillow's resize above PIL_RESIZE_ABOVE_PIXELS,
    the batched matrix products below it; both must give open_clip's exact float32 values."""
    w, h = size
    rng = np.random.default_rng(w)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (np.stack([np.sin(xx / (9 + c)) + np.cos(yy / (13 + c)) for c in range(3)], -1) + 2) * 60
    pixels = np.clip(smooth + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    assert (w * h > PIL_RESIZE_ABOVE_PIXELS) == (size != (640, 480))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    config = ClipPreprocessConfig(size=224, mean=mean, std=std, interpolation=interpolation)
    transform = open_clip.image_transform(224, is_train=False, mean=mean, std=std, interpolation=interpolation)
    got = preprocess_pil(im, config)
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    assert np.array_equal(got, transform(im).numpy())


def test_preprocess_pil_refuses_what_is_not_rgb():
    with pytest.raises(ValueError, match="RGB"):
        preprocess_pil(Image.new("L", (3000, 2000)))


@pytest.mark.parametrize("size", [(2100, 1500), (1201, 2000), (1000, 750), (640, 480), (225, 900), (224, 224)],
                         ids=["wide-3mp", "tall-2.4mp", "fast-decode", "small", "narrow", "model-size"])
def test_crop_only_is_within_a_grey_level_of_open_clips_transform(size):
    """--precision fast resamples only the centre crop: the same filter at the same scale, so every pixel is
    open_clip's or one grey level from it, and only a few are (Pillow's weights for a box differ in the last bit)."""
    w, h = size
    rng = np.random.default_rng(w + h)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (np.stack([np.sin(xx / (7 + c)) + np.cos(yy / (11 + c)) for c in range(3)], -1) + 2) * 60
    im = Image.fromarray(np.clip(smooth + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    config = ClipPreprocessConfig()
    exact = open_clip.image_transform(224, is_train=False)(im).numpy()
    fast = preprocess_pil(im, config, crop_only=True)
    assert fast.dtype == np.float32 and fast.shape == (3, 224, 224)
    levels = np.abs(fast - exact) * np.asarray(config.std, np.float32).reshape(3, 1, 1) * 255  # back to grey levels
    assert levels.max() <= 1.0 + 1e-3
    assert (levels > 0.5).mean() < 0.01  # a handful of pixels, not a shifted image
    assert np.array_equal(preprocess_pil(im, config), exact)  # the default stays bit-exact


def test_crop_only_leaves_images_smaller_than_the_model_on_the_exact_path():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 180, 3), dtype=np.uint8))
    assert np.array_equal(preprocess_pil(im, crop_only=True), preprocess_pil(im))
