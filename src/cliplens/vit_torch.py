"""``--precision fast``'s bf16 image tower built from the checkpoint's tensors, without importing open_clip.

Importing open_clip cost every fast-mode run 1.4-1.9 s and 226 MB before its first image (it imports torchvision,
which imports ``torch._dynamo`` and triton). Once the image-only cache (:mod:`cliplens.imageonly`) has recorded a
model's tower (its shapes, heads, activation, preprocessing), a later fast run reads the ``visual.*`` tensors of
its safetensors checkpoint, casts each to bf16 and packs its linears (:mod:`cliplens.packed`), and runs the same
operations in the same order as open_clip's ``VisionTransformer`` does under :class:`cliplens.fast.CastVisual`:
tests/unit/test_vit_torch.py compares the two on the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cliplens.imageonly import ImageOnlyEncoder
from cliplens.packed import PackedMLP, PackedSelfAttention, trim_heap


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


def checkpoint_tensors(path: str, dtype=torch.bfloat16):
    """``get(name)`` for the ``visual.`` tensors of a safetensors checkpoint, each read and cast on its own."""
    from safetensors import safe_open

    handle = safe_open(path, framework="pt")
    if "visual.conv1.weight" not in set(handle.keys()):
        raise KeyError("not an open_clip checkpoint with a visual tower")
    return lambda name: handle.get_tensor("visual." + name).to(dtype).contiguous()


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
        with torch.inference_mode():
            self.tower = PackedViT(checkpoint_tensors(checkpoint), meta["vit"]).eval()
        trim_heap()
        self.image_workers = torch.get_num_threads() if _omp_set_num_threads() else 1
        self._pool_init = _one_thread_here

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.tower(torch.from_numpy(pixels)).numpy()
