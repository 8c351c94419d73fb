"""The oneDNN-packed image tower (cliplens.packed) against the unpacked open_clip tower it replaces."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import open_clip
from cliplens import fast, packed
from cliplens.encoder import load_encoder

pytestmark = pytest.mark.skipif(not packed.available(), reason="this torch build has no oneDNN (mkldnn)")


def _pixels(rng, n=3, size=224):
    return torch.from_numpy(rng.standard_normal((n, 3, size, size), dtype=np.float32))


def _visual(tiny_model):
    model, _, _ = open_clip.create_model_and_transforms(tiny_model)
    return model.eval().visual


def test_packed_tower_equals_open_clips_and_replaces_every_block(tiny_model, rng):
    visual = _visual(tiny_model)
    original = copy.deepcopy(visual)
    x = _pixels(rng)
    assert packed.pack_visual(visual) and visual.cliplens_packed
    blocks = visual.transformer.resblocks
    assert all(isinstance(b.attn, packed.PackedSelfAttention) and isinstance(b.mlp, packed.PackedMLP) for b in blocks)
    # the tiny model uses QuickGELU: folded into a fused swish on c_fc
    assert all(b.mlp.fc.post == "swish" for b in blocks)
    with torch.inference_mode():
        want, got = original(x), visual(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not packed.pack_visual(visual) or visual.cliplens_packed  # packing twice is a no-op


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_blocks_get_the_fused_gelu(approximate, rng):
    block = open_clip.transformer.ResidualAttentionBlock(64, 4, act_layer=lambda: nn.GELU(approximate=approximate))
    block.eval()
    want_block = copy.deepcopy(block)
    x = torch.from_numpy(rng.standard_normal((2, 7, 64), dtype=np.float32))
    mlp = packed.PackedMLP.from_mlp(block.mlp)
    assert mlp is not None and mlp.fc.post == "gelu" and mlp.fc.algorithm == approximate
    block.mlp, block.attn = mlp, packed.PackedSelfAttention(block.attn)
    with torch.inference_mode():
        np.testing.assert_allclose(block(x).numpy(), want_block(x).numpy(), atol=2e-5, rtol=0)


def test_quick_gelu_fold_is_the_identity_it_claims():
    x = torch.linspace(-8, 8, 1001)
    s = packed.QUICK_GELU_SCALE
    np.testing.assert_allclose((torch.nn.functional.silu(s * x) / s).numpy(), (x * torch.sigmoid(s * x)).numpy(),
                               atol=1e-6, rtol=0)


def test_unsupported_parts_are_left_alone():
    relu_mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(8, 32)), ("gelu", nn.ReLU()), ("c_proj", nn.Linear(32, 8))]))
    assert packed.PackedMLP.from_mlp(relu_mlp) is None
    assert not packed.PackedSelfAttention.supports(nn.MultiheadAttention(8, 2))  # not batch-first
    assert not packed.PackedSelfAttention.supports(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True))
    assert packed.PackedSelfAttention.supports(nn.MultiheadAttention(8, 2, batch_first=True))


def test_a_packed_tower_that_disagrees_is_put_back(tiny_model, rng, monkeypatch, caplog):
    visual = _visual(tiny_model)
    x = _pixels(rng, n=2)
    with torch.inference_mode():
        want = visual(x)
    before = [(b.attn, b.mlp) for b in visual.transformer.resblocks]
    real = packed.PackedLinear.forward
    monkeypatch.setattr(packed.PackedLinear, "forward", lambda self, x: real(self, x) * 1.5)  # a broken kernel
    assert not packed.pack_visual(visual)
    assert [(b.attn, b.mlp) for b in visual.transformer.resblocks] == before
    assert not getattr(visual, "cliplens_packed", False)
    assert "stays unpacked" in caplog.text
    with torch.inference_mode():
        assert torch.equal(visual(x), want)


def test_exact_encoder_packs_lazily_and_keeps_parity(tiny_model, rng):
    enc = load_encoder(tiny_model, device="cpu")
    reference = load_encoder(tiny_model, device="cpu")
    reference.pack_images = False
    assert not getattr(enc.model.visual, "cliplens_packed", False)  # loading alone packs nothing
    enc.encode_texts(["a photo of a seal."])
    assert not getattr(enc.model.visual, "cliplens_packed", False)  # nor does text
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got, want = enc.encode_images(images), reference.encode_images(images)
    assert enc.model.visual.cliplens_packed and not getattr(reference.model.visual, "cliplens_packed", False)
    assert enc.info.precision == "exact"
    assert np.abs(got - want).max() <= 1e-5
    assert float((got * want).sum(axis=1).min()) >= 0.99999



def test_packing_in_the_background_gives_the_same_vectors_and_runs_once(tiny_model, rng, monkeypatch):
    """Indexers start packing while the first batches decode; the first encode waits for it, and packs nothing twice."""
    import cliplens.packed as packed

    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    want = load_encoder(tiny_model, device="cpu").encode_images(images)  # packed on first use, in this thread
    calls = []
    real = packed.pack_visual
    monkeypatch.setattr(packed, "pack_visual", lambda *a, **k: calls.append(1) or real(*a, **k))
    enc = load_encoder(tiny_model, device="cpu")
    enc.prepare_images_in_background()
    enc.prepare_images_in_background()  # a second call while the first runs: still one packing
    got = enc.encode_images(images)
    assert enc.model.visual.cliplens_packed and len(calls) == 1
    assert np.array_equal(got, want)


@pytest.mark.slow
def test_b32_packed_fp32_and_bf16_agree_with_the_unpacked_tower(b32_weights, rng):
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="openai")
    visual = model.eval().visual
    x = _pixels(rng, n=2)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(visual(x), dim=-1)
        bf16 = copy.deepcopy(visual).to(torch.bfloat16)
        unpacked16 = bf16(x.to(torch.bfloat16)).float()
        bf16_packed = packed.pack_visual(bf16, min_cosine=0.999)
        again16 = bf16(x.to(torch.bfloat16)).float()
        got16 = torch.nn.functional.normalize(again16, dim=-1)
        assert packed.pack_visual(visual)
        got = torch.nn.functional.normalize(visual(x), dim=-1)
    assert float((got * want).sum(-1).min()) >= 0.99999  # exact mode's bar
    if fast.has_bf16():  # bf16 is fast mode's tower only on CPUs that multiply bf16 natively: there it must pack
        assert bf16_packed
    if bf16_packed:
        assert float((got16 * want).sum(-1).mean()) >= 0.999  # fast mode's bar
    else:  # refused on its probe (this CPU emulates bf16): the original modules are back, bit for bit
        assert torch.equal(again16, unpacked16)
