"""Stand-in models for the benchmarks: real architectures, random weights, real loading path.

No weights can be downloaded here, so each benchmark writes random weights where open_clip looks for the
real ones (the Hugging Face hub cache layout, ``$HF_HOME/hub/models--ORG--NAME/...``) and loads them with
``HF_HUB_OFFLINE=1`` through both ``open_clip.create_model_and_transforms`` (the reference) and
``cliplens.encoder.load_encoder`` (ours). Speed depends on the architecture, not on the weights' values.

- ``b32``: ``ViT-B-32-quickgelu`` with the ``openai`` tag, whose weights open_clip finds in
  ``timm/vit_base_patch32_clip_224.openai`` (the default; what the targets are about).
- ``tiny``: a two-layer CLIP with the real tokenizer and 224 px input, as ``hf-hub:cliplens-bench/tiny-clip``
  (for smoke tests of the harness only: its numbers mean nothing).

huggingface_hub reads ``HF_HOME`` when it is first imported, so :func:`prepare` must run before anything
imports open_clip; ``python -m bench`` calls it first thing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

_COMMIT = "0123456789abcdef0123456789abcdef01234567"
B32_REPO = "timm/vit_base_patch32_clip_224.openai"
TINY_REPO = "cliplens-bench/tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class StandIn:
    """One model both loaders are given by the same name and tag."""

    key: str
    label: str
    model: str  # name for both loaders
    pretrained: str | None


STANDINS = {
    "b32": StandIn("b32", "ViT-B-32-quickgelu (openai layout, random weights)", "ViT-B-32-quickgelu", "openai"),
    "tiny": StandIn("tiny", "tiny 2-layer CLIP (smoke test only)", f"hf-hub:{TINY_REPO}", None),
}


def prepare(hf_home: Path, which: str, *, seed: int = 0) -> StandIn:
    """Point the hub cache at ``hf_home`` (offline) and write the stand-in there unless already present."""
    if which not in STANDINS:
        raise ValueError(f"unknown stand-in {which!r}: use {' or '.join(STANDINS)}")
    if "huggingface_hub" in __import__("sys").modules and os.environ.get("HF_HOME") != str(hf_home):
        raise RuntimeError("huggingface_hub was imported before the benchmark set HF_HOME; run it as `python -m bench`")
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    repo = B32_REPO if which == "b32" else TINY_REPO
    snap = _snapshot(hf_home, repo)
    weights = snap / "open_clip_model.safetensors"
    if not weights.is_file():
        if which == "tiny":
            (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": {}}))
        _write_random_weights(weights, which, seed)
    return STANDINS[which]


def use_existing(hf_home: Path, which: str) -> StandIn:
    """Use a cache that already holds the model's weights (real ones, say); nothing is written to it."""
    if which not in STANDINS:
        raise ValueError(f"unknown stand-in {which!r}: use {' or '.join(STANDINS)}")
    repo = B32_REPO if which == "b32" else TINY_REPO
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    if not repo_dir.is_dir():
        raise SystemExit(f"bench: {repo_dir} does not exist; leave out --hf-home to use random stand-in weights")
    os.environ["HF_HOME"] = str(hf_home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return STANDINS[which]


def _snapshot(hf_home: Path, repo_id: str) -> Path:
    repo_dir = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / _COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(_COMMIT)
    return snap


def _write_random_weights(path: Path, which: str, seed: int) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if which == "tiny":
        model = open_clip.model.CLIP(**TINY_CONFIG)
    else:  # open_clip logs "initialized randomly" on the root logger: that is the point here
        quiet = logging.Filter()
        quiet.filter = lambda record: "initialized randomly" not in record.getMessage()
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
        finally:
            logging.getLogger().removeFilter(quiet)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def load_reference(standin: StandIn):
    """open_clip's own (model, eval transform, tokenizer), exactly as a user would create them."""
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(standin.model, pretrained=standin.pretrained)
    model.eval()
    return model, transform, open_clip.get_tokenizer(standin.model)


def load_ours(standin: StandIn, *, precision: str = "exact", fast_backend: str = "auto"):
    from cliplens.encoder import load_encoder

    return load_encoder(standin.model, standin.pretrained, device="cpu", precision=precision,
                        fast_backend=fast_backend)
