"""Class text embeddings (every class x every template), cached on disk.

Zero-shot classification and class-prompt retrieval need one text embedding per (class, template): 100 classes x
80 ImageNet templates is 8,000 prompts, about a minute for ViT-B/32 on a CPU. They depend only on the model, the
templates and the class names, so they are kept in ``$CLIPLENS_HOME/textcache`` (or any folder given) and a second
evaluation reads them back instead of re-encoding.

The cache key is a sha256 of: model name, pretrained tag, weights sha256, precision, device kind (CUDA runs in
fp16 autocast, so its numbers differ), the exact template strings (hashed) and the class names in order. What is
stored is the per-prompt features *before* ensembling, unnormalised when the encoder can give them
(``encode_texts_raw``), so both ensembling orders (``prompts.ensemble(order=...)``) come from one entry and the
order is not part of the key. A model without weights (random init, no sha256) is never cached: two random
models would share a key. Files are written atomically; a file whose stored key does not match is ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens._files import cliplens_home, write_bytes_atomic
from cliplens.prompts import class_prompts, ensemble

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_CHUNK = 1024  # prompts per encoder call: a progress step every few seconds on a CPU


@dataclass(frozen=True)
class ClassTexts:
    """Per-prompt text features of C classes under T templates."""

    names: tuple[str, ...]
    templates: tuple[str, ...]
    features: np.ndarray  # float32 (C, T, D); raw (unnormalised) when ``raw`` else unit rows
    raw: bool  # False when the encoder only gave unit vectors: then both ensembling orders coincide
    from_cache: bool

    def classifier(self, order: str = "normalize-first") -> np.ndarray:
        """(C, D) float32 unit class vectors, ensembled over the templates in ``order``."""
        return ensemble(self.features, order=order)


def default_cache_dir() -> Path:
    return cliplens_home() / "textcache"


def cache_key(info, names: Sequence[str], templates: Sequence[str], *, device: str = "cpu", raw: bool = True) -> str | None:
    """Hex sha256 identifying these class text features, or None when the model cannot be identified."""
    if not getattr(info, "weights_sha256", None):
        return None
    fields = {
        "version": CACHE_VERSION,
        "model": info.name,
        "pretrained": info.pretrained,
        "weights_sha256": info.weights_sha256,
        "precision": getattr(info, "precision", None),
        "device": "cuda" if str(device).startswith("cuda") else str(device),
        "templates_sha256": hashlib.sha256(json.dumps(list(templates)).encode()).hexdigest(),
        "class_names": list(names),
        "raw": raw,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _encode(encoder, prompts: list[str], *, raw: bool, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    fn = encoder.encode_texts_raw if raw else encoder.encode_texts
    chunks = []
    with tqdm(total=len(prompts), unit="prompt", desc="class prompts", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, len(prompts), _CHUNK):
            chunks.append(np.asarray(fn(prompts[i : i + _CHUNK]), dtype=np.float32))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)


def _read(path: Path, key: str) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                log.warning("text cache %s holds another key; re-encoding", path)
                return None
            return np.asarray(f["features"], dtype=np.float32)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as exc:  # truncated or foreign file: re-encode and overwrite it
        log.warning("text cache %s is unreadable (%s); re-encoding", path, exc)
        return None


def class_text_features(encoder, names: Sequence[str], templates: Sequence[str], *, cache: bool = True,
                        cache_dir: str | Path | None = None, progress: bool = False) -> ClassTexts:
    """Features of ``templates`` filled with ``names``, read from the cache when present, else encoded and stored."""
    names, templates = tuple(names), tuple(templates)
    prompts = class_prompts(names, templates)  # validates the templates
    raw = hasattr(encoder, "encode_texts_raw")
    key = cache_key(encoder.info, names, templates, device=getattr(encoder, "device", "cpu"), raw=raw) if cache else None
    path = Path(cache_dir or default_cache_dir()) / f"{key[:40]}.npz" if key else None
    if cache and key is None:
        log.info("model %s has no weights sha256: class text features are not cached", encoder.info.name)
    if path is not None:
        features = _read(path, key)
        if features is not None and features.shape[:2] == (len(names), len(templates)):
            log.info("class text features from cache %s", path)
            return ClassTexts(names, templates, features, raw, from_cache=True)
    flat = _encode(encoder, [p for row in prompts for p in row], raw=raw, progress=progress)
    features = flat.reshape(len(names), len(templates), -1)
    if path is not None:
        buf = io.BytesIO()
        np.savez(buf, features=features, key=np.array(key))
        try:
            write_bytes_atomic(path, buf.getvalue())
        except OSError as exc:  # a read-only home only costs us the cache
            log.warning("cannot write text cache %s (%s)", path, exc)
    return ClassTexts(names, templates, features, raw, from_cache=False)
