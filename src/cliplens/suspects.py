"""Labels worth a second look, and near-duplicates between a train and a test index.

The score (a confident-learning-style *self-confidence*, Northcutt et al. 2021): for item i with given label y_i,

    p_zs(i)  = softmax(100 * f_i W^T)                 zero-shot class probabilities (W: class prompt vectors)
    p_nn(i)  = label histogram of its k nearest labelled neighbours (cosine; k = 10) divided by k; the
               neighbours come from the train index when one is given, else from the same index without i itself
    p(i)     = (p_zs(i) + p_nn(i)) / 2
    self-confidence(i) = p(i)[y_i]

An item is a **suspect** when its label disagrees with both the zero-shot prediction (argmax p_zs) and the
neighbours' vote (argmax p_nn, ties to the higher class index as everywhere in cliplens). Suspects are ranked by
self-confidence, lowest first (ties by id), and each comes with the label CLIP would give instead: argmax of p
over the other classes. Published context (quoted, not measured here): Northcutt et al. (2021) estimate about 6%
of the CIFAR-100 test set is mislabelled (5.85%).

**Near-duplicates**: each test item's most similar train item; pairs with cosine at or above a threshold are
listed. The threshold is measured (``copy_threshold``): images re-encoded as JPEG and resized are embedded
beside their originals, and the threshold is the 1st percentile of those copy-to-original cosines, so 99% of
such copies would be caught. Published context: Barz & Denzler (2020, ciFAIR) found about 10% of the CIFAR-100
test images have near-duplicates in the training set.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from cliplens.adapters import softmax, zero_shot_logits
from cliplens.errors import CliplensError

log = logging.getLogger(__name__)

NEIGHBOURS = 10
DEFAULT_DUP_THRESHOLD = 0.95  # used only when there are no thumbnails to measure one on
_CHUNK = 1024
PUBLISHED = (
    {"claim": "about 6% of the CIFAR-100 test set is mislabelled (5.85%)", "value": 0.0585,
     "source": "Northcutt, Athalye & Mueller 2021, 'Pervasive label errors in test sets'"},
    {"claim": "about 10% of the CIFAR-100 test images have near-duplicates in the training set", "value": 0.10,
     "source": "Barz & Denzler 2020, 'Do we train on test data?' (ciFAIR)"},
)


class SuspectsError(CliplensError):
    """Suspects cannot be computed (no labels) or a reference file is malformed."""


def nearest(queries: np.ndarray, base: np.ndarray, k: int, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (Q, k): the k most similar rows of ``base`` per query, best first, in blocks."""
    base = np.asarray(base, np.float32)
    k = min(k, len(base) - (1 if exclude_self else 0))
    ids = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for lo in range(0, len(queries), _CHUNK):
        s = np.asarray(queries[lo:lo + _CHUNK], np.float32) @ base.T
        if exclude_self:
            s[np.arange(len(s)), np.arange(lo, lo + len(s))] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)  # best first, ties by id
        ids[lo:lo + len(s)] = np.take_along_axis(part, order, axis=1)
        scores[lo:lo + len(s)] = np.take_along_axis(ps, order, axis=1)
    return scores, ids


def _argmax_high(p: np.ndarray) -> np.ndarray:
    return p.shape[1] - 1 - np.argmax(p[:, ::-1], axis=1)


def find_suspects(emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray, *, num_classes: int,
                  ref_emb: np.ndarray | None = None, ref_labels: np.ndarray | None = None,
                  neighbours: int = NEIGHBOURS) -> dict:
    """Every item's self-confidence, predictions and the ranked suspects (see the module docstring)."""
    labels = np.asarray(labels, np.int64)
    p_zs = softmax(zero_shot_logits(emb, class_emb))
    same = ref_emb is None
    base, base_labels = (emb, labels) if same else (ref_emb, np.asarray(ref_labels, np.int64))
    if len(base) < 2:
        raise SuspectsError("suspects need at least 2 labelled items to take neighbours from")
    _, nn = nearest(emb, base, neighbours, exclude_self=same)
    p_nn = np.zeros((len(labels), num_classes))
    np.add.at(p_nn, (np.repeat(np.arange(len(labels)), nn.shape[1]), base_labels[nn].ravel()), 1.0)
    p_nn /= nn.shape[1]
    p = (p_zs + p_nn) / 2
    rows = np.arange(len(labels))
    conf = p[rows, labels]
    zs_pred, nn_pred = _argmax_high(p_zs), _argmax_high(p_nn)
    other = p.copy()
    other[rows, labels] = -np.inf
    suggested = _argmax_high(other)
    flagged = np.flatnonzero((zs_pred != labels) & (nn_pred != labels))
    ranked = flagged[np.lexsort((flagged, conf[flagged]))]
    return {"self_confidence": conf, "zero_shot_pred": zs_pred, "neighbour_pred": nn_pred, "suggested": suggested,
            "suggested_prob": p[rows, suggested], "ranked": ranked, "neighbours": int(nn.shape[1]),
            "neighbours_from": "same index" if same else "train index"}


def near_duplicates(test_emb: np.ndarray, train_emb: np.ndarray, threshold: float) -> dict:
    """Test items whose nearest train item has cosine >= ``threshold``, most similar first."""
    scores, ids = nearest(test_emb, train_emb, 1)
    hit = np.flatnonzero(scores[:, 0] >= threshold)
    hit = hit[np.lexsort((hit, -scores[hit, 0]))]
    return {"threshold": float(threshold), "count": int(len(hit)), "share": float(len(hit) / max(len(test_emb), 1)),
            "pairs": [{"test_id": int(i), "train_id": int(ids[i, 0]), "cosine": float(scores[i, 0])} for i in hit]}


def _copy(img: np.ndarray, rng: np.random.Generator):
    """A re-encoded copy: downscaled by 10-25%, scaled back, saved as JPEG at quality 70-90."""
    from PIL import Image

    im = Image.fromarray(np.asarray(img, np.uint8))
    f = rng.uniform(0.75, 0.9)
    small = im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.resize(im.size, Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=int(rng.integers(70, 91)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copy_threshold(encoder, images: np.ndarray, *, sample: int = 256, seed: int = 0, quantile: float = 0.01,
                   embeddings: np.ndarray | None = None) -> dict:
    """Cosine between originals and re-encoded copies of a seeded sample; its 1st percentile is the threshold.
    ``embeddings``: the encoder's embeddings of every one of ``images``, where the caller has them already (the
    sample's rows are taken from them instead of encoding those images again)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(images), size=min(sample, len(images)), replace=False))
    if embeddings is not None and len(embeddings) != len(images):
        raise ValueError(f"{len(embeddings)} embeddings for {len(images)} images")
    originals = (embeddings[pick] if embeddings is not None else
                 encoder.encode_images([Image.fromarray(np.asarray(images[i], np.uint8)) for i in pick]))
    copies = encoder.encode_images([_copy(images[i], rng) for i in pick])
    cos = np.sum(np.asarray(originals, np.float64) * np.asarray(copies, np.float64), axis=1)
    return {"threshold": float(np.quantile(cos, quantile)), "sample": int(len(pick)), "quantile": quantile,
            "copy_cosine_min": float(cos.min()), "copy_cosine_median": float(np.median(cos))}


def read_reference(path: str | Path, count: int) -> np.ndarray:
    """Known-bad item ids: a JSON list, or one id per line (# comments and blank lines skipped)."""
    import json

    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuspectsError(f"{path}: cannot read the reference list ({type(exc).__name__})") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else \
            [line.split("#")[0].strip() for line in text.splitlines()]
        if not isinstance(values, list) or any(isinstance(v, (bool, float)) for v in values):
            raise TypeError("not a list of whole numbers")
        ids = [int(v) for v in values if str(v).strip() != ""]
    except (ValueError, TypeError):
        ids = None
    if ids is None:
        raise SuspectsError(f"{path}: expected item ids, one per line or a JSON list such as [12, 857]")
    bad = [i for i in ids if not 0 <= i < count]
    if bad:
        raise SuspectsError(f"{path}: id {bad[0]} is outside this index (ids run 0..{count - 1})")
    return np.unique(np.asarray(ids, np.int64))


def precision_at(ranked: np.ndarray, reference: np.ndarray, ns=(10, 50, 100)) -> dict:
    """Share of the top N suspects that are in the reference list, for each N (N capped at the suspects found)."""
    ref = set(int(i) for i in reference)
    out = {}
    for n in ns:
        top = ranked[:n]
        out[str(n)] = float(np.mean([int(i) in ref for i in top])) if len(top) else None
    return out
