"""CLIP's eval preprocessing of a fixed-size uint8 batch in torch, on the encoder's device (the GPU).

The same arithmetic as :func:`cliplens.preprocess.preprocess_batch`, which is bit-exact with Pillow +
torchvision: each resampling pass is one matrix product with the same fixed-point weights
(:func:`cliplens.preprocess._coefficients`: integers times 2**-22), plus Pillow's rounding offset 0.5, then
floor and clip to [0, 255] exactly as the numpy path does it; the passes run in the same order; then the
centre crop (only the cropped outputs are computed), ToTensor and Normalize in float32.

Why float64: a pass's sums are integers below 2**31 times 2**-22, exact in float64 in any summation order
(so a GPU's DGEMM gives the numpy path's bits), not in float32 or TF32. The products are small (32x32 ->
224x224: ~5.5 M multiply-adds per image), well under a millisecond per thousand images on an H100's FP64
units. Normalising divides by device tensors, never by Python scalars: torch's CUDA kernel turns a division
by a scalar into a multiplication by its reciprocal, which can differ from numpy's division in the last bit.

Runs on any torch device; the unit tests compare it with ``preprocess_batch`` on the CPU. Only the encoder
package imports this module (it imports torch).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from cliplens.preprocess import (
    ClipPreprocessConfig,
    _coefficients,
    _nearest_index,
    center_crop_box,
    resized_shape,
)

_BLOCK_IMAGES = 256  # images per block: the float64 temporaries stay ~0.3 GB at 224 px


@functools.lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int, start: int, stop: int, interpolation: str, device: str):
    """Outputs ``start:stop`` of one axis: None (same size: Pillow skips the pass), a long index tensor
    (nearest), or the dense float64 (stop - start, in_size) weight matrix, on ``device``."""
    if in_size == out_size:
        return None
    if interpolation == "nearest":
        return torch.tensor(_nearest_index(in_size, out_size)[start:stop], device=device)  # a copy: the cache is read-only
    xmins, kk = _coefficients(in_size, out_size, interpolation)
    dense = np.zeros((stop - start, in_size))
    for row, o in enumerate(range(start, stop)):
        taps = min(kk.shape[1], in_size - int(xmins[o]))  # weights past xmax are zero
        dense[row, xmins[o] : xmins[o] + taps] = kk[o, :taps]
    return torch.as_tensor(dense, device=device)


def _pass(planes: torch.Tensor, op, axis: int, raw: bool) -> torch.Tensor:
    """One pass along ``axis`` (2: rows, 3: columns) of float64 (N, C, H, W) planes holding uint8 values.

    Returns the pass floored and clipped to [0, 255] (Pillow's ``clip8((ss + 2**21) >> 22)``), or with
    ``raw`` the sums with the offset, not yet rounded, as the numpy path returns them.
    """
    if op is None:
        return planes
    if op.dtype == torch.long:  # nearest: a gather, no arithmetic
        return planes.index_select(axis, op)
    acc = torch.matmul(planes, op.T) if axis == 3 else torch.matmul(op, planes)
    acc += 0.5
    return acc if raw else acc.floor_().clamp_(0.0, 255.0)


def preprocess_on_device(images: torch.Tensor, config: ClipPreprocessConfig = ClipPreprocessConfig()) -> torch.Tensor:
    """uint8 (N, H, W, C) tensor (C = 3, or 1 for grey) -> float32 (N, 3, size, size) on the same device.

    Equal to ``preprocess_batch(images.numpy(), config)`` (bit-identical on the CPU; see the module note).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 1:
        raise ValueError(f"images must be a uint8 tensor of shape (N, H, W, 3 or 1), got {images.dtype} "
                         f"{tuple(images.shape)}")
    n, h, w, c = images.shape
    s = config.size
    rh, rw = resized_shape(h, w, s)
    top, left = center_crop_box(rh, rw, s)
    device = str(images.device)
    yop = _weights(h, rh, top, top + s, config.interpolation, device)
    xop = _weights(w, rw, left, left + s, config.interpolation, device)
    if yop is None:  # same height: the crop is a slice (Pillow resamples nothing along this axis)
        images = images[:, top : top + s]
    if xop is None:
        images = images[:, :, left : left + s]
    # Pillow 13's pass order (see cliplens.preprocess._resize_planes): vertical first when it shrinks the
    # height by more than twice as many pixels as the width
    vertical_first = h >= rh and (h - rh) > (w - rw) * 2
    kind = dict(device=images.device, dtype=torch.float32)
    mean = torch.tensor(config.mean, **kind).reshape(1, 3, 1, 1)
    std = torch.tensor(config.std, **kind).reshape(1, 3, 1, 1)
    scale = torch.tensor(255.0, **kind)
    out = torch.empty((n, 3, s, s), **kind)
    for i in range(0, n, _BLOCK_IMAGES):
        planes = images[i : i + _BLOCK_IMAGES].permute(0, 3, 1, 2).to(torch.float64)
        if vertical_first:
            pixels = _pass(_pass(planes, yop, 2, False), xop, 3, True)
        else:
            pixels = _pass(_pass(planes, xop, 3, False), yop, 2, True)
        # the last pass's raw sums: finish Pillow's rounding (a no-op on values an earlier pass rounded)
        block = pixels.floor_().to(torch.float32).clamp_(0.0, 255.0)  # exact: small integers; grey broadcasts to RGB
        out[i : i + len(block)] = (block / scale - mean) / std  # ToTensor, Normalize: float32, torchvision's order
    return out
