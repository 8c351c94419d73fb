"""cliplens.gpu_tower: each rewrite of open_clip's ViT image tower computes what the original does.

Checked in float64 on the CPU, where the only differences left are the rewrites' own (a matrix product for the
convolution, silu with folded scales for QuickGELU), far below anything fp16 rounding on a GPU could hide.
"""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import LayerNormFp32, QuickGELU, VisionTransformer
from torch import nn

from cliplens import gpu_tower


def _vit(*, act_layer=QuickGELU, norm_layer=None, image_size=64, patch_size=16, seed=0) -> VisionTransformer:
    torch.manual_seed(seed)
    extra = {"norm_layer": norm_layer} if norm_layer is not None else {}
    vit = VisionTransformer(image_size=image_size, patch_size=patch_size, width=64, layers=2, heads=4, mlp_ratio=4.0,
                            output_dim=32, act_layer=act_layer, **extra).eval()
    with torch.no_grad():  # open_clip initialises some of these to zero or ones: make every term count
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vit


def _pixels(n=3, size=64, seed=1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("act_layer", [QuickGELU, nn.GELU])
def test_the_prepared_tower_computes_what_open_clips_does(act_layer):
    original = _vit(act_layer=act_layer).double()
    prepared = copy.deepcopy(original)
    assert gpu_tower.prepare(prepared, dtype=torch.float64)
    x = _pixels()
    with torch.inference_mode():
        want, got = original(x), prepared(x)
    assert got.dtype == torch.float64 and got.shape == want.shape == (3, 32)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), float((got - want).abs().max())
    assert isinstance(prepared.conv1, gpu_tower.PatchEmbed)
    gelus = [type(b.mlp.gelu) for b in prepared.transformer.resblocks]
    assert gelus == ([nn.SiLU] * 2 if act_layer is QuickGELU else [nn.GELU] * 2)


def test_quickgelu_is_folded_into_the_linears_around_it():
    original = _vit()
    prepared = copy.deepcopy(original)
    gpu_tower.prepare(prepared, dtype=torch.float32)
    a, b = original.transformer.resblocks[0].mlp, prepared.transformer.resblocks[0].mlp
    assert torch.allclose(b.c_fc.weight, a.c_fc.weight * 1.702) and torch.allclose(b.c_fc.bias, a.c_fc.bias * 1.702)
    assert torch.allclose(b.c_proj.weight, a.c_proj.weight / 1.702) and torch.equal(b.c_proj.bias, a.c_proj.bias)


@pytest.mark.parametrize("size", [64, 70])  # 70: rows and columns past the last whole patch, dropped by both
def test_patch_embedding_equals_the_convolution(size):
    conv = nn.Conv2d(3, 24, kernel_size=16, stride=16, bias=False).double()
    x = _pixels(2, size)
    with torch.inference_mode():
        want, got = conv(x), gpu_tower.PatchEmbed(conv)(x)
    assert got.shape == want.shape == (2, 24, 4, 4)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fp16_weights_except_float32_layer_norms():
    vit = _vit(norm_layer=LayerNormFp32)
    assert gpu_tower.prepare(vit)
    assert vit.conv1.weight.dtype == torch.float16 and vit.proj.dtype == torch.float16
    assert vit.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float16
    assert all(m.weight.dtype == torch.float32 for m in vit.modules() if isinstance(m, LayerNormFp32))


def test_towers_it_does_not_know_are_left_untouched():
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    before = copy.deepcopy(other.state_dict())
    assert not gpu_tower.prepare(other)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in other.state_dict().items())
    vit = _vit()
    vit.conv1 = nn.Conv2d(3, 64, kernel_size=16, stride=8, bias=False)  # overlapping patches: not a matrix product
    assert not gpu_tower.prepare(vit)
    assert isinstance(vit.conv1, nn.Conv2d) and vit.conv1.weight.dtype == torch.float32


def test_an_encoder_whose_tower_holds_its_own_dtype_runs_it_without_autocast(tiny_model):
    """The encoder's CUDA branch (a prepared tower, ``_visual_dtype`` set), here on the CPU in float64."""
    from cliplens.encoder import load_encoder

    encoder = load_encoder(tiny_model, device="cpu")  # its own: the tower is changed in place
    encoder.pack_images = False  # the tower as open_clip built it, as on CUDA
    pixels = encoder.preprocess(torch.randint(0, 256, (2, 40, 50, 3), dtype=torch.uint8).numpy())
    want = encoder.encode_pixels(pixels)
    assert gpu_tower.prepare(encoder.model.visual, dtype=torch.float64)
    encoder._visual_dtype = torch.float64
    got = encoder.encode_pixels(pixels)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert abs(got - want).max() < 1e-5  # float32 tower vs float64 tower: float32 rounding only
