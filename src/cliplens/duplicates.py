"""Near-identical images: collapsing them in results, and listing every group (``cliplens duplicates``).

Two items are near-identical when their image embeddings' cosine is at or above a threshold *measured for the
model*: a seeded sample of the index's own images is re-encoded (resized, saved as JPEG at quality 70-90) and
embedded beside the originals (:func:`cliplens.suspects.copy_threshold`), and the same sample's pairs of different
images are measured too. The threshold is the 1st percentile of the copy-to-original cosines, lowered by a quarter
of the gap down to the different pairs' 99th percentile: 99% of the sampled copies and harsher ones still clear
it, different pictures stay well below. when their 99th percentile reaches the threshold the model cannot tell copies from different
pictures (random stand-in weights, for one), and collapsing stays off rather than merging different photos (the
99th, not the maximum: a library's own duplicates are among those pairs, a few in a hundred at most).

A measurement is recorded per weights sha256 in ``$CLIPLENS_HOME/calibration/<sha256>.duplicates.json`` (made by
``cliplens duplicates``, or by ``cliplens index`` on a folder or list when it has the model loaded anyway), and
used by ``search``, ``serve`` and the page for every index built with those weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cliplens._files import write_json_atomic
from cliplens.errors import CliplensError

log = logging.getLogger(__name__)

SAMPLE = 64
GAP_SHARE = 0.25  # of the gap between copies and different images, taken off the copies' 1st percentile
_CHUNK = 2048


class DuplicatesError(CliplensError):
    """Near-duplicate detection cannot run as asked."""


@dataclass(frozen=True)
class Threshold:
    threshold: float | None  # None: the model does not separate copies from distinct images (no collapsing)
    copies_p01: float  # 1st percentile of copy-to-original cosines
    distinct_p99: float  # 99th percentile of cosines between different sampled images
    sample: int
    measured: bool = True  # False: given by the user (--threshold)

    @property
    def usable(self) -> bool:
        return self.threshold is not None

    def to_json(self) -> dict:
        return asdict(self)


def given(threshold: float) -> Threshold:
    if not -1.0 <= threshold <= 1.0:  # False for NaN too
        raise DuplicatesError(f"a duplicate threshold is a cosine from -1 to 1, got {threshold!r}")
    return Threshold(float(threshold), float("nan"), float("nan"), 0, measured=False)


# --------------------------------------------------------------------------- measuring


def sample_images(store, n: int = SAMPLE, seed: int = 0) -> list[np.ndarray]:
    """uint8 (H, W, 3) arrays of a seeded sample: CIFAR tiles, or the stored 512 px thumbnails of photos."""
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(store), size=min(n, len(store)), replace=False))
    tiles = store.images()
    if tiles is not None:
        return [np.asarray(tiles[i]) for i in pick]
    if not getattr(store, "has_thumbnails", False):
        raise DuplicatesError(f"index {store.root} stores no images to measure a threshold on: give a threshold, or "
                              "re-index the folder so it stores thumbnails")
    out = []
    for i in pick:
        data = store.thumbnail(int(i), 512)
        if data:
            with Image.open(BytesIO(data)) as im:
                out.append(np.asarray(im.convert("RGB")))
    return out


def measure(encoder, store, *, sample: int = SAMPLE, seed: int = 0) -> Threshold:
    from cliplens.suspects import copy_threshold

    images = sample_images(store, sample, seed)
    if len(images) < 4:
        raise DuplicatesError(f"index {store.root} has too few images ({len(images)}) to measure a threshold on: "
                              "give one")
    emb = np.asarray(encoder.encode_images([_pil(a) for a in images]), np.float64)
    copies = copy_threshold(encoder, images, sample=len(images), seed=seed, embeddings=emb)
    cos = emb @ emb.T
    distinct = float(np.quantile(cos[np.triu_indices(len(emb), 1)], 0.99))
    c = float(copies["threshold"])
    return Threshold(threshold=c - GAP_SHARE * (c - distinct) if c > distinct else None, copies_p01=c,
                     distinct_p99=distinct, sample=len(images))


def _pil(a):
    from PIL import Image

    return Image.fromarray(np.asarray(a, np.uint8))


def _path(weights_sha256: str | None) -> Path | None:
    from cliplens.calibrate import calibration_dir

    return calibration_dir() / f"{weights_sha256}.duplicates.json" if weights_sha256 else None


def record(model, t: Threshold, *, index: str) -> Path | None:
    path = _path(model.weights_sha256)
    if path is None:
        return None  # random weights: nothing stable to key the measurement on
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model": model.name, "pretrained": model.pretrained,
                             "weights_sha256": model.weights_sha256, "index": index,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **t.to_json()})
    return path


def recorded(model) -> Threshold | None:
    """The measurement recorded for these weights, or None."""
    path = _path(getattr(model, "weights_sha256", None))
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Threshold(data["threshold"], float(data["copies_p01"]), float(data["distinct_p99"]),
                         int(data["sample"]))
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring the unreadable duplicate threshold %s", path)
        return None


# --------------------------------------------------------------------------- grouping


def collapse(embeddings: np.ndarray, ids, threshold: float) -> list[list[int]]:
    """Ranked ``ids`` grouped greedily: each joins the first earlier group whose head it matches at or above
    ``threshold`` (cosine), else starts its own. Groups keep rank order; each group's head is its best hit."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    vecs = np.asarray(embeddings[np.asarray(ids)], np.float32)
    heads: list[int] = []  # positions in ids
    groups: list[list[int]] = []
    for pos in range(len(ids)):
        if heads:
            cos = vecs[heads] @ vecs[pos]
            best = int(np.argmax(cos))
            if cos[best] >= threshold:
                groups[best].append(ids[pos])
                continue
        heads.append(pos)
        groups.append([ids[pos]])
    return groups


def all_groups(embeddings: np.ndarray, threshold: float) -> list[dict]:
    """Every group of two or more items linked by cosines at or above ``threshold`` (connected components),
    largest first; each with its members (lowest id first) and the lowest cosine of a member to the first."""
    n = len(embeddings)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    full = np.asarray(embeddings, np.float32)
    for lo in range(0, n, _CHUNK):
        block = full[lo : lo + _CHUNK] @ full.T
        rows, cols = np.nonzero(np.triu(block >= threshold, k=lo + 1))
        for r, c in zip(rows.tolist(), cols.tolist()):
            a, b = find(lo + r), find(c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    groups = []
    for ids in members.values():
        if len(ids) > 1:
            cos = full[ids[1:]] @ full[ids[0]]
            groups.append({"ids": ids, "size": len(ids), "min_cosine": round(float(cos.min()), 6)})
    groups.sort(key=lambda g: (-g["size"], g["ids"][0]))
    return groups
