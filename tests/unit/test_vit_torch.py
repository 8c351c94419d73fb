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
    ours = PackedViT(checkpoint_tensors(tiny_encoder.info.weights_path), tower_record(visual))
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
