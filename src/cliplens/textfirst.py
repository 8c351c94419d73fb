"""A server's encoder: text queries from the torch-free text tower at once, the full model only for images.

``cliplens serve`` is ready to answer text queries without importing torch (seconds sooner); the first image query
or upload loads the full model (:func:`cliplens.encoder.load_encoder`, through the CLI's flags), once, and waits
for it.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np

from cliplens.errors import ModelError

log = logging.getLogger(__name__)


class TextFirstEncoder:
    """A server's encoder: texts from the torch-free tower from the start, images from the full model, loaded on
    the first image query (``load_full``, called once; its model must be the one ``info`` names).

    ``cliplens serve`` is ready to answer text queries without importing torch; only image queries wait for it.
    """

    text_only = False  # images work too (later)

    def __init__(self, text, load_full, *, full=None):
        self.text, self.info = text, text.info
        self._load_full, self._full = load_full, full
        self._lock = threading.Lock()

    @property
    def full_loaded(self) -> bool:
        return self._full is not None

    def full(self):
        with self._lock:
            if self._full is None:
                log.info("loading the image tower (first image query)")
                full = self._load_full()
                if (full.info.name, full.info.weights_sha256) != (self.info.name, self.info.weights_sha256):
                    raise ModelError(f"the full model {full.info.name} is not the text tower's {self.info.name}")
                self._full = full
        return self._full

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text.encode_texts(texts)

    def encode_images(self, images) -> np.ndarray:
        return self.full().encode_images(images)
