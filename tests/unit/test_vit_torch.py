"""Fast mode's bf16 image tower built from the checkpoint without open_clip (cliplens.vit_torch) computes what
open_clip's tower computes under CastVisual (bf16, packed), on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplens import fast
from cliplens.packed import available


@pytest.mark.skipif(not available(), reason="needs torch's oneDNN packed linear")
def test_checkpoint_built_bf16_tower_equals_castvisual_on_open_clips(tiny_encoder, rng):
    from cliplens.vit_onnx import tower_record, unpacked_visual
    from cliplens.vit_torch import PackedViT, checkpoint_tensors

    visual = unpacked_visual(tiny_encoder)
    reference = fast.CastVisual(visual)  # open_clip's VisionTransformer, bf16, packed
    get = checkpoint_tensors(tiny_encoder.info.weights_path)
    ours = PackedViT(get, tower_record(visual))
    get.close()
    x = torch.from_numpy(tiny_encoder.preprocess(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)))
    with torch.inference_mode():
        want, got = reference(x), ours(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)  # the same operations in the same order


def test_a_checkpoint_without_a_visual_tower_is_refused(tmp_path):
    from safetensors.torch import save_file

    from cliplens.vit_torch import checkpoint_tensors

    save_file({"text.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeyError, match="visual"):
        checkpoint_tensors(str(tmp_path / "other.safetensors"))


def test_the_checkpoint_reader_gives_safetensors_own_tensors(tmp_path, rng):
    """checkpoint_tensors reads the file with pread, not a mapping: each tensor equals what safetensors loads, cast."""
    from safetensors.torch import load_file, save_file

    from cliplens.vit_torch import checkpoint_tensors

    tensors = {"visual.conv1.weight": torch.from_numpy(rng.standard_normal((4, 3, 2, 2), dtype=np.float32)),
               "visual.proj": torch.from_numpy(rng.standard_normal((6, 5), dtype=np.float32)).half(),
               "visual.ln_pre.bias": torch.zeros(0), "text.weight": torch.ones(3)}
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    want = load_file(path)
    get = checkpoint_tensors(path)
    try:
        for name in ("conv1.weight", "proj", "ln_pre.bias"):
            got = get(name)
            assert got.dtype == torch.bfloat16 and got.shape == want["visual." + name].shape
            assert torch.equal(got, want["visual." + name].to(torch.bfloat16))
        with pytest.raises(ValueError, match="visual.missing"):
            get("missing")
    finally:
        get.close()


def _damaged(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("change, error", [
    (lambda d: d[:4], "not a safetensors file"),  # shorter than the length field
    (lambda d: (10**12).to_bytes(8, "little") + d[8:], "not a safetensors file"),  # a header longer than the file
    (lambda d: d[:-10], "outside the file"),  # the data cut short
    (lambda d: len(b"[" * 5000 + b"]" * 5000).to_bytes(8, "little") + b"[" * 5000 + b"]" * 5000, "nests too deeply"),
    (lambda d: (2).to_bytes(8, "little") + b"{}", "visual"),  # no tensors at all
])
def test_a_damaged_checkpoint_raises_value_or_key_error(tmp_path, change, error):
    from safetensors.torch import save_file

    from cliplens.vit_torch import checkpoint_tensors

    good = tmp_path / "good.safetensors"
    save_file({"visual.conv1.weight": torch.ones(4, 3, 2, 2)}, str(good))
    path = _damaged(tmp_path / "bad.safetensors", change(good.read_bytes()))
    with pytest.raises((ValueError, KeyError), match=error):
        get = checkpoint_tensors(path)
        try:
            get("conv1.weight")
        finally:
            get.close()
