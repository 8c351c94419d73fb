"""Stand-in CLIP checkpoints written in the real on-disk layouts, so the real loading code runs offline.

- ``write_hub_repo`` lays files out exactly as huggingface_hub's cache does
  (``$HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<commit>/...}``); with HF_HUB_OFFLINE=1,
  ``hf_hub_download`` (and so open_clip) resolves them without any network.
- ``TINY_CONFIG`` is a two-layer CLIP with the real tokenizer vocabulary and the real 224 px input, so the
  preprocessing, tokenizer and pooling code paths are the production ones, only the widths are small.
"""

from __future__ import annotations

import json
from pathlib import Path

OPENAI_B32_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip looks for ViT-B-32 openai weights
TINY_REPO = "cliplens-test/tiny-clip"
TINY_MODEL = f"hf-hub:{TINY_REPO}"
_COMMIT = "0123456789abcdef0123456789abcdef01234567"

TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_hub_repo(hf_home: Path, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """Write ``files`` as the cached snapshot of ``repo_id``; returns the snapshot folder."""
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / _COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(_COMMIT)
    for name, content in files.items():
        target = snap / name
        if isinstance(content, Path):
            content.replace(target)
        else:
            target.write_bytes(content)
    return snap


def random_state_dict(model_name: str | None = None, *, config: dict | None = None, seed: int = 0) -> dict:
    """Random weights for a model, from open_clip's own constructor (so every key and shape is real)."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    if config is not None:
        model = open_clip.model.CLIP(**config)
    else:
        model = open_clip.create_model(model_name, pretrained=None)
    # Randomise the projection and logit scale too, so tests see non-trivial outputs.
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_tiny_model(hf_home: Path, seed: int = 0) -> str:
    """The tiny CLIP as an ``hf-hub:`` repo in the cache; returns its model name for load_encoder/--model."""
    from safetensors.torch import save_file

    snap = write_hub_repo(hf_home, TINY_REPO, {
        "open_clip_config.json": json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}).encode(),
    })
    save_file(random_state_dict(config=TINY_CONFIG, seed=seed), str(snap / "open_clip_model.safetensors"))
    return TINY_MODEL


TINY_RN_REPO = "cliplens-test/tiny-resnet"
TINY_RN_CONFIG = {  # a ResNet image tower (open_clip's ModifiedResNet): not a ViT, so no image-only tower
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": TINY_CONFIG["text_cfg"],
}


def write_tiny_resnet(hf_home: Path, seed: int = 0) -> str:
    """A tiny ResNet CLIP as an ``hf-hub:`` repo in the cache; returns its model name."""
    from safetensors.torch import save_file

    snap = write_hub_repo(hf_home, TINY_RN_REPO, {
        "open_clip_config.json": json.dumps({"model_cfg": TINY_RN_CONFIG, "preprocess_cfg": {}}).encode(),
    })
    save_file(random_state_dict(config=TINY_RN_CONFIG, seed=seed), str(snap / "open_clip_model.safetensors"))
    return f"hf-hub:{TINY_RN_REPO}"


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny CLIP's weights as a plain torch checkpoint file (for --weights with a registered config)."""
    import torch

    torch.save({"state_dict": random_state_dict(config=TINY_CONFIG, seed=seed)}, path)
    return path


def write_openai_b32(hf_home: Path, seed: int = 0) -> Path:
    """Random weights for the real ViT-B-32-quickgelu architecture where open_clip looks for ``openai``."""
    from safetensors.torch import save_file

    snap = write_hub_repo(hf_home, OPENAI_B32_REPO, {})
    path = snap / "open_clip_model.safetensors"
    save_file(random_state_dict("ViT-B-32-quickgelu", seed=seed), str(path))
    return path
