"""cliplens.gpu_preprocess (torch, the encoder's device) against preprocess_batch (numpy, Pillow-exact), on the CPU.

The GPU path must be the CPU exact path's arithmetic, not an approximation of it: same fixed-point weights, the
same rounding and clipping after each pass, the same pass order, crop and float32 normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplens.gpu_preprocess import preprocess_on_device
from cliplens.preprocess import INTERPOLATIONS, ClipPreprocessConfig, preprocess_batch

# CIFAR; non-square both ways (crop along either axis); a height shrunk far more than the width (Pillow's
# vertical-first order); one side already at the size (that pass skipped); a larger downscale
SHAPES = [(32, 32), (40, 30), (30, 40), (300, 230), (224, 180), (250, 250)]


def _images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    images[0] = ((np.indices((h, w)).sum(axis=0) % 2) * 255)[..., None]  # 0/255 edges: both clips exercised
    return images


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_numpy_exact_path_bit_for_bit(shape, interpolation):
    images = _images(3, *shape)
    config = ClipPreprocessConfig(interpolation=interpolation)
    expected = preprocess_batch(images, config)
    got = preprocess_on_device(torch.from_numpy(images), config)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    assert np.array_equal(got.numpy(), expected), float(np.abs(got.numpy() - expected).max())


@pytest.mark.parametrize("size", [224, 96, 7])
def test_other_sizes_grey_images_other_statistics_and_several_blocks(size, monkeypatch):
    import cliplens.gpu_preprocess as gp

    monkeypatch.setattr(gp, "_BLOCK_IMAGES", 2)  # 5 images: three blocks
    config = ClipPreprocessConfig(size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    for channels in (3, 1):
        images = _images(5, 33, 47, channels, seed=channels)
        got = preprocess_on_device(torch.from_numpy(images), config).numpy()
        assert np.array_equal(got, preprocess_batch(images, config))


def test_refuses_what_it_does_not_reproduce():
    for bad in (torch.zeros((2, 8, 8, 3), dtype=torch.float32), torch.zeros((8, 8, 3), dtype=torch.uint8),
                torch.zeros((2, 8, 8, 4), dtype=torch.uint8)):
        with pytest.raises(ValueError, match="uint8 tensor of shape"):
            preprocess_on_device(bad)


def test_indexing_preprocesses_on_the_device_when_asked_and_gets_the_same_bytes(tiny_encoder, tiny_index, cifar_test,
                                                                                 tmp_path, monkeypatch):
    """CPU encoders keep the numpy path; one that preprocesses on its device (CUDA; forced here) gives the same index."""
    from cliplens.embed import index_labeled
    from cliplens.store import IndexStore

    assert tiny_encoder.device_preprocess is False  # CPU: byte-identical behaviour, numpy preprocessing
    monkeypatch.setattr(tiny_encoder, "device_preprocess", True)
    calls = []
    real = tiny_encoder._encode_on_device
    monkeypatch.setattr(tiny_encoder, "_encode_on_device", lambda images: calls.append(len(images)) or real(images))
    monkeypatch.setattr(tiny_encoder, "preprocess", lambda images: pytest.fail("numpy preprocessing ran"))
    index_labeled(cifar_test, tiny_encoder, tmp_path / "on-device", batch_size=32, progress=False)
    assert sum(calls) == len(cifar_test) and max(calls) == 32
    got = np.asarray(IndexStore.open(tmp_path / "on-device").embeddings)
    assert got.tobytes() == np.asarray(IndexStore.open(tiny_index).embeddings).tobytes()
    assert not tiny_encoder.preprocesses_on_device([cifar_test.images[0]])  # lists of PIL images: numpy path
    frozen = cifar_test.images[:4].copy()
    frozen.flags.writeable = False  # a memory-mapped or shared batch: encoded as well, without torch's warning
    assert np.allclose(tiny_encoder.encode_images(frozen), vectors_of(tiny_index)[:4], atol=1e-6)  # another batch shape


def vectors_of(index_dir) -> np.ndarray:
    from cliplens.store import IndexStore

    return np.asarray(IndexStore.open(index_dir).embeddings)
