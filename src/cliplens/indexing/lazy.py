"""An encoder that loads its model only when something needs encoding.

Re-running ``cliplens index`` on an unchanged source must cost nothing: no model load (seconds for ViT-B/32,
mostly importing torch). The indexers need the model's *identity* (``ModelInfo``) to decide what is up to date,
and the model itself only for images that must be embedded. When the index already records the model a command
asks for, :func:`same_request` says so from the manifest and the cached sha256 of the weights file, without
importing torch, and :class:`LazyEncoder` hands out that recorded ``ModelInfo`` until the model is really needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from cliplens._files import cached_sha256
from cliplens.errors import ModelError
from cliplens.manifest import ModelInfo

log = logging.getLogger(__name__)


def same_request(built: ModelInfo, *, name: str, pretrained: str | None, weights: str | Path | None,
                 precision: str) -> bool:
    """True when loading (name, pretrained, weights, precision) gives the model ``built`` records."""
    if built.name not in (name, f"{name}-quickgelu"):  # a tag that needs QuickGELU switches to the -quickgelu config
        return False
    if (precision == "fast") != built.precision.startswith("fast"):
        return False
    try:
        if weights is not None:
            return bool(built.weights_sha256) and cached_sha256(weights) == built.weights_sha256
        if name.startswith(("hf-hub:", "local-dir:")) or not pretrained:
            same_tag = built.pretrained is None
        else:
            same_tag = built.pretrained == pretrained
        if not same_tag:
            return False
        if built.weights_path is None:  # random weights: nothing on disk to compare
            return built.weights_sha256 is None and pretrained is None
        return cached_sha256(built.weights_path) == built.weights_sha256  # the file is still what was used
    except OSError:
        return False


class LazyEncoder:
    """Stands in for an encoder: ``info`` without loading when it is known, the real encoder on first real use."""

    def __init__(self, load: Callable[[], object], *, info: ModelInfo | None = None):
        self._load, self._info, self._encoder = load, info, None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    @property
    def info(self) -> ModelInfo:
        return self._info if self._info is not None else self.encoder.info

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = self._load()
            if self._info is not None and not self._encoder.info.same_vectors(self._info):
                raise ModelError(f"the model loaded is {self._encoder.info.label()}, not the {self._info.label()} "
                                 "the index records; pass the model flags explicitly")
            self._info = self._encoder.info
        return self._encoder

    def __getattr__(self, name: str):  # preprocess, encode_pixels, device, model, ...: the real encoder's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.encoder, name)
