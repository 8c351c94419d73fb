"""CUDA: open_clip's ViT image tower made ready for inference once, in fp16 weights instead of fp16 autocast.

Profiled on an H200 (docs/performance.md, GPU run), ViT-B/32 under ``torch.autocast`` spent 48 ms per 1,024
images, of which the patch embedding alone took 8.5 ms (cuDNN runs a stride-32 convolution as a slow
``precomputed_convolve_sgemm``), and the casts autocast makes at every call (weights to fp16, LayerNorm inputs to
fp32 and back) most of another 10. Here the tower is changed in place, three ways, none changing the arithmetic
beyond fp16 rounding:

- the weights are fp16 (half the memory), so the tower runs without autocast and casts nothing per call;
- the patch embedding, a convolution whose kernel equals its stride, is the same products as one matrix product
  of the flattened patches with the flattened kernel (:class:`PatchEmbed`);
- QuickGELU, ``z * sigmoid(1.702 z)``, three elementwise passes over the MLP's widest tensor, equals
  ``silu(1.702 z) / 1.702``: the 1.702 is folded into the weights and bias of ``c_fc`` and its inverse into
  ``c_proj``'s weights, leaving one in-place ``silu``.

Towers it does not know (ResNets, other activations' blocks keep theirs) are left to autocast: :func:`prepare`
says which. tests/unit/test_gpu_tower.py checks each rewrite against the original tower in float32 on the CPU;
the GPU run measures the whole against the CPU exact path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUICK_GELU_SCALE = 1.702  # open_clip's QuickGELU: x * sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """A bias-free convolution whose kernel equals its stride, as one matrix product: (N,C,H,W) -> (N,width,gh,gw).

    Rows and columns past the last whole patch are dropped, as the convolution drops them."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        width, channels, ph, pw = conv.weight.shape
        self.patch = (ph, pw)
        # (width, C*ph*pw) in the order (C, row, column) of the patches flattened below
        self.weight = nn.Parameter(conv.weight.detach().reshape(width, channels * ph * pw), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.patch
        gh, gw = h // ph, w // pw
        patches = (x[:, :, : gh * ph, : gw * pw].reshape(n, c, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * ph * pw))
        # (N, L, width) seen as the convolution's (N, width, gh, gw): a view, no copy
        return F.linear(patches, self.weight).transpose(1, 2).reshape(n, -1, gh, gw)


def _is_patch_conv(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.groups == 1
            and tuple(conv.kernel_size) == tuple(conv.stride) and tuple(conv.padding) == (0, 0)
            and tuple(conv.dilation) == (1, 1))


def _fold_quick_gelu(mlp: nn.Module) -> bool:
    """``c_fc -> QuickGELU -> c_proj`` as ``(1.702 c_fc) -> silu -> (c_proj / 1.702)``; False if ``mlp`` is not that."""
    from open_clip.transformer import QuickGELU

    fc, act, proj = (getattr(mlp, name, None) for name in ("c_fc", "gelu", "c_proj"))
    if not (isinstance(act, QuickGELU) and isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)):
        return False
    with torch.no_grad():
        fc.weight.mul_(QUICK_GELU_SCALE)
        if fc.bias is not None:
            fc.bias.mul_(QUICK_GELU_SCALE)
        proj.weight.div_(QUICK_GELU_SCALE)
    mlp.gelu = nn.SiLU(inplace=True)  # c_fc's output is a fresh tensor nothing else reads
    return True


def prepare(visual: nn.Module, dtype: torch.dtype = torch.float16) -> bool:
    """Rewrite open_clip's ``VisionTransformer`` in place for inference in ``dtype``; False (untouched) otherwise.

    Done in float32 first (the folds multiply float32 weights), then cast. ``LayerNormFp32`` layers keep float32
    weights, since they compute in float32 by design.
    """
    from open_clip.transformer import LayerNormFp32, VisionTransformer

    if not isinstance(visual, VisionTransformer) or not _is_patch_conv(visual.conv1):
        return False
    visual.conv1 = PatchEmbed(visual.conv1)
    for block in visual.transformer.resblocks:
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            _fold_quick_gelu(mlp)
    visual.to(dtype)
    for module in visual.modules():
        if isinstance(module, LayerNormFp32):
            module.float()
    visual.eval()
    return True
