"""The encoder must produce exactly what open_clip produces on the same weights, through the real loading path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip
from cliplens.encoder import load_encoder
from cliplens.errors import ModelError

TEXTS = ["a photo of a tractor.", "seal", "a wax seal on a letter", "a photo of a rotary phone, an old telephone."]


def _open_clip_reference(model_name, pretrained, images, texts):
    """open_clip's own pipeline: its eval transform per PIL image, encode_image/encode_text, then normalise."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(a)) for a in images])
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()
    return pixels.numpy(), img, txt


def test_tiny_model_parity_with_open_clip(tiny_encoder, tiny_model, rng):
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ref_pixels, ref_img, ref_txt = _open_clip_reference(tiny_model, None, images, TEXTS)
    np.testing.assert_allclose(tiny_encoder.preprocess(images), ref_pixels, atol=1e-6, rtol=0)
    ours_img = tiny_encoder.encode_images(images)
    ours_txt = tiny_encoder.encode_texts(TEXTS)
    assert ours_img.dtype == np.float32 and ours_img.shape == (6, 32)
    assert np.abs(ours_img - ref_img).max() <= 1e-5
    assert np.abs(ours_txt - ref_txt).max() <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours_img, axis=1), 1, atol=1e-6)


def test_pil_inputs_of_any_size_and_mode_match_open_clip(tiny_encoder, tiny_model, rng):
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_model)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 90), (300, 200)]]
    pics.append(pics[0].convert("P"))  # a palette image takes open_clip's own transform
    ours = tiny_encoder.preprocess(pics)
    ref = np.stack([preprocess(p).numpy() for p in pics])
    assert np.abs(ours - ref).max() <= 1e-6


def test_text_prefix_encoding_is_exact_and_cached(tiny_encoder):
    # The prefix trick must equal the 77-token pass for short and long texts mixed in one batch.
    long_text = " ".join(["tractor"] * 70)  # truncated to the context by the tokenizer
    texts = ["seal", long_text, "a photo of a tulip."]
    tokens = tiny_encoder.tokenizer(texts)
    with torch.no_grad():
        full = torch.nn.functional.normalize(tiny_encoder.model.encode_text(tokens), dim=-1).numpy()
    fresh = tiny_encoder._encode_texts_uncached(texts)
    assert np.abs(fresh - full).max() <= 1e-6
    first = tiny_encoder.encode_texts(texts)
    again = tiny_encoder.encode_texts(texts[::-1])
    np.testing.assert_array_equal(first[::-1], again)


@pytest.mark.slow
def test_default_model_is_quickgelu_vit_b32_from_the_hub_cache(b32_encoder, b32_weights):
    from open_clip.transformer import QuickGELU

    info = b32_encoder.info
    assert (info.name, info.pretrained, info.embed_dim, info.image_size) == ("ViT-B-32-quickgelu", "openai", 512, 224)
    assert info.quick_gelu
    model = b32_encoder.model
    assert sum(isinstance(m, QuickGELU) for m in model.transformer.modules()) == 12  # one per text block
    blocks = model.visual.transformer.resblocks
    if getattr(model.visual, "cliplens_packed", False):  # packed by an earlier test: QuickGELU became fused swish
        assert [b.mlp.fc.post for b in blocks] == ["swish"] * 12
    else:
        assert sum(isinstance(m, QuickGELU) for m in model.visual.modules()) == 12
    assert not any(isinstance(m, torch.nn.GELU) for m in b32_encoder.model.modules())
    assert info.weights_path == str(b32_weights.resolve()) or info.weights_path == str(b32_weights)
    import hashlib

    assert info.weights_sha256 == hashlib.sha256(b32_weights.read_bytes()).hexdigest()


@pytest.mark.slow
def test_b32_parity_with_open_clip_openai_tag(b32_encoder, rng):
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    _, ref_img, ref_txt = _open_clip_reference("ViT-B-32-quickgelu", "openai", images, TEXTS)
    assert np.abs(b32_encoder.encode_images(images) - ref_img).max() <= 1e-5
    assert np.abs(b32_encoder.encode_texts(TEXTS) - ref_txt).max() <= 1e-5


@pytest.mark.slow
def test_plain_vit_b32_with_openai_tag_is_switched_to_quickgelu(b32_weights, caplog):
    enc = load_encoder("ViT-B-32", "openai", device="cpu")
    assert enc.info.name == "ViT-B-32-quickgelu" and enc.info.quick_gelu
    assert "QuickGELU" in caplog.text


def test_missing_weights_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelError) as err:
        load_encoder("ViT-B-16", "openai", device="cpu")  # never written by any fixture
    msg = str(err.value)
    assert "\n" not in msg and "--weights" in msg and "hf download timm/vit_base_patch16_clip_224.openai" in msg


@pytest.mark.parametrize("kwargs, needle", [
    ({"model": "ViT-B-99"}, "unknown model 'ViT-B-99'"),
    ({"model": "ViT-B-32", "pretrained": "nope"}, "no pretrained tag 'nope'"),
    ({"model": "ViT-B-32", "weights": "/no/such/file.pt"}, "does not exist"),
    ({"model": "ViT-B-32", "device": "tpu"}, "unknown device"),
])
def test_bad_model_arguments(kwargs, needle):
    with pytest.raises(ModelError, match=needle):
        load_encoder(**kwargs)


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    import model_fixture

    ckpt = model_fixture.write_tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ModelError, match="is it a checkpoint for this model"):
        load_encoder("ViT-B-32-quickgelu", weights=ckpt, device="cpu")


def _same_model(ours, ref):
    """Every parameter and buffer (the causal mask, which no checkpoint holds, too): same names, dtype, values."""
    mine = dict((*ours.named_parameters(), *ours.named_buffers()))
    theirs = dict((*ref.named_parameters(), *ref.named_buffers()))
    assert mine.keys() == theirs.keys()
    for name, t in theirs.items():
        assert not mine[name].is_meta and mine[name].dtype == t.dtype, name
        assert torch.equal(mine[name], t), name
    assert ours.training is False


def test_the_model_built_on_meta_and_assigned_its_weights_is_open_clips_model(b32_weights, tmp_path):
    ref, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="openai")
    ref.eval()
    _same_model(load_encoder("ViT-B-32-quickgelu", "openai", device="cpu").model, ref)  # (the fixture's is packed)
    half = tmp_path / "half.pt"  # a float16 checkpoint: cast to the model's float32, as copying into it casts
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, half)
    del ref
    ours = load_encoder("ViT-B-32-quickgelu", weights=half, device="cpu")
    ref16, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained=str(half))
    ref16.eval()
    _same_model(ours.model, ref16)
