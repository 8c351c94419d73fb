"""``--precision fast``'s bf16 image tower built from the checkpoint's tensors, without importing open_clip.

Importing open_clip cost every fast-mode run 1.4-1.9 s and 226 MB before its first image (it imports torchvision,
which imports ``torch._dynamo`` and triton). Once the image-only cache (:mod:`cliplens.imageonly`) has recorded a
model's tower (its shapes, heads, activation, preprocessing), a later fast run reads the ``visual.*`` tensors of
its safetensors checkpoint, casts each to bf16 and packs its linears (:mod:`cliplens.packed`), and runs the same
operations in the same order as open_clip's ``VisionTransformer`` does under :class:`cliplens.fast.CastVisual`:
tests/unit/test_vit_torch.py compares the two on the same weights.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cliplens._safe import MAX_JSON_DEPTH, json_depth
from cliplens.imageonly import ImageOnlyEncoder
from cliplens.packed import (
    PackedMLP,
    PackedSelfAttention,
    release_library_pages,
    trim_heap,
)


class _Norm(nn.Module):
    def __init__(self, weight, bias, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.eps = eps

    def forward(self, x):  # open_clip's LayerNorm: layer_norm, then back to the input's dtype
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


class _Block(nn.Module):
    """open_clip's ResidualAttentionBlock as packing leaves it (cliplens.packed): packed self-attention, and the MLP
    with its activation fused."""

    def __init__(self, get, prefix: str, *, heads: int, activation: str, eps: float):
        super().__init__()
        self.ln_1 = _Norm(get(prefix + "ln_1.weight"), get(prefix + "ln_1.bias"), eps)
        self.ln_2 = _Norm(get(prefix + "ln_2.weight"), get(prefix + "ln_2.bias"), eps)
        self.attn = PackedSelfAttention.from_weights(
            get(prefix + "attn.in_proj_weight"), get(prefix + "attn.in_proj_bias"),
            get(prefix + "attn.out_proj.weight"), get(prefix + "attn.out_proj.bias"), num_heads=heads)
        self.mlp = PackedMLP.from_weights(
            get(prefix + "mlp.c_fc.weight"), get(prefix + "mlp.c_fc.bias"), get(prefix + "mlp.c_proj.weight"),
            get(prefix + "mlp.c_proj.bias"), activation="quickgelu" if activation == "quickgelu" else "gelu:none")

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))[0]
        return x + self.mlp(self.ln_2(x))


class PackedViT(nn.Module):
    """CLIP's ViT image tower from ``get(name)`` (the checkpoint's ``visual.*`` tensors, already cast):
    float32 (N,3,S,S) in, float32 (N,D) out, computing in the tensors' dtype (bf16 here)."""

    def __init__(self, get, vit: dict):
        super().__init__()
        self.dtype = get("conv1.weight").dtype
        self.register_buffer("conv", get("conv1.weight"))
        self.register_buffer("cls", get("class_embedding"))
        self.register_buffer("pos", get("positional_embedding"))
        self.register_buffer("proj", get("proj"))
        eps = float(vit["eps"])
        self.ln_pre = _Norm(get("ln_pre.weight"), get("ln_pre.bias"), eps)
        self.ln_post = _Norm(get("ln_post.weight"), get("ln_post.bias"), eps)
        self.blocks = nn.ModuleList(_Block(get, f"transformer.resblocks.{i}.", heads=int(vit["heads"]),
                                           activation=vit["activation"], eps=eps) for i in range(int(vit["layers"])))
        self.patch = int(vit["patch"])

    def forward(self, x):
        x = F.conv2d(x.to(self.dtype), self.conv, stride=self.patch)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.cls.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.pos.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return (self.ln_post(x)[:, 0] @ self.proj).float()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 100 << 20  # bytes of a safetensors header (JSON); open_clip's ViT-B/32 has 40 KB


def checkpoint_tensors(path: str, dtype=torch.bfloat16):
    """``get(name)`` for the ``visual.`` tensors of a safetensors checkpoint, each read and cast on its own.

    The file is read tensor by tensor with ``pread`` (the format: an 8-byte little-endian header length, a JSON
    header naming each tensor's dtype, shape and byte span, then the data), not memory-mapped: a mapping keeps every
    page it was read from resident until it closes, which held the fp32 tower (~370 MB for ViT-B/32) beside the
    bf16 one while the tower was built (measured 1,093-1,096 MiB at the peak against 723-732; the same 684 after).
    A header that is not such a file raises ValueError; one without a visual tower, KeyError.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if length is None or not 2 <= length <= min(MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        text = os.pread(fd, length, 8)
        if json_depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"{path}: its header nests too deeply to be a safetensors header")
        header = json.loads(text)
    except BaseException:
        os.close(fd)
        raise
    if not isinstance(header, dict) or "visual.conv1.weight" not in header:
        os.close(fd)
        raise KeyError("not an open_clip checkpoint with a visual tower")
    base = 8 + length

    def get(name: str) -> torch.Tensor:
        entry = header.get("visual." + name)
        try:
            kind, shape, (begin, end) = _DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: no usable entry for visual.{name}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=kind).element_size()
        if not (0 <= begin <= end and end - begin == nbytes and base + end <= size):
            raise ValueError(f"{path}: visual.{name} lies outside the file or has the wrong size")
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], base + begin + done)
            if got <= 0:
                raise ValueError(f"{path} ended inside visual.{name}")
            done += got
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=kind).reshape(shape).to(dtype).contiguous()

    get.close = lambda: os.close(fd)
    return get


class FastTowerEncoder(ImageOnlyEncoder):
    """The image-only encoder's preprocessing and slicing with the bf16 :class:`PackedViT` (one slice per core, each
    on one torch thread), for ``--precision fast`` runs that load no open_clip."""

    SLICE_IMAGES = 1 << 30  # one slice per core, as Encoder slices its batches

    def __init__(self, folder, meta: dict, *, checkpoint: str, backend: str = "bf16"):
        import dataclasses

        from cliplens.encoder import _omp_set_num_threads, _one_thread_here
        from cliplens.manifest import ModelInfo

        self._setup(folder, meta)
        self.info = dataclasses.replace(ModelInfo(**meta["model"]), precision=f"fast:{backend}")
        get = checkpoint_tensors(checkpoint)
        try:
            with torch.inference_mode():
                self.tower = PackedViT(get, meta["vit"]).eval()
        finally:
            get.close()
        trim_heap()
        release_library_pages()  # torch's CUDA libraries, read at import, never run here
        self.image_workers = torch.get_num_threads() if _omp_set_num_threads() else 1
        self._pool_init = _one_thread_here

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.tower(torch.from_numpy(pixels)).numpy()
