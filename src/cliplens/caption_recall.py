"""Text-to-image and image-to-text recall@k on a captioned index, with CLIP_benchmark's definitions.

CLIP_benchmark (``clip_benchmark/metrics/zeroshot_retrieval.py``) scores every caption against every image
(cosine similarity of unit vectors, ``texts @ images.T``) and marks the true (caption, image) pairs; then

- text-to-image recall@k ("image_retrieval_recall@k"): the share of captions whose image is among their k best
  images;
- image-to-text recall@k ("text_retrieval_recall@k"): the share of images with *any* of their captions among
  their k best captions (over the images that have a caption).

Captions are encoded as written (no prompt template), as CLIP_benchmark does. Ties in a ranking go to the lower
index (:func:`cliplens.metrics.topk_indices`), where torch.topk's choice is unspecified.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from cliplens.metrics import topk_indices

KS = (1, 5, 10)
_BLOCK = 1024  # query rows scored at a time: a (1024, N) float32 block, bounded memory for large indexes


def caption_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                   ks: Sequence[int] = KS) -> dict:
    """Recall@k both ways. ``text_image[t]`` is the image row caption ``t`` describes."""
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_image = np.asarray(text_image, np.int64)
    n_img, n_txt = len(image_emb), len(text_emb)
    if text_image.shape != (n_txt,) or (n_txt and (text_image.min() < 0 or text_image.max() >= n_img)):
        raise ValueError(f"text_image must give an image row in 0..{n_img - 1} for each of the {n_txt} captions")
    out: dict = {"images": n_img, "captions": n_txt, "ks": list(ks)}
    deepest = max(ks)
    hits_t2i = np.zeros((n_txt, len(ks)), bool)
    for lo in range(0, n_txt, _BLOCK):
        top = topk_indices(text_emb[lo : lo + _BLOCK] @ image_emb.T, min(deepest, n_img))
        for j, k in enumerate(ks):
            hits_t2i[lo : lo + _BLOCK, j] = (top[:, :k] == text_image[lo : lo + _BLOCK, None]).any(axis=1)
    hits_i2t = np.zeros((n_img, len(ks)), bool)
    for lo in range(0, n_img, _BLOCK):
        top = topk_indices(image_emb[lo : lo + _BLOCK] @ text_emb.T, min(deepest, n_txt))
        owner = text_image[top]  # the image each of the best captions describes
        rows = np.arange(lo, min(lo + _BLOCK, n_img))[:, None]
        for j, k in enumerate(ks):
            hits_i2t[lo : lo + _BLOCK, j] = (owner[:, :k] == rows).any(axis=1)
    captioned = np.unique(text_image)  # an image without a caption has nothing to find: not counted
    for j, k in enumerate(ks):
        out[f"text_to_image_recall@{k}"] = float(hits_t2i[:, j].mean()) if n_txt else None
        out[f"image_to_text_recall@{k}"] = float(hits_i2t[captioned, j].mean()) if len(captioned) else None
    return out


def index_captions(store) -> tuple[list[str], np.ndarray] | None:
    """(captions, the image row of each) from an index's ``captions`` (JSON lists) or ``caption`` column."""
    items = store.items
    if "captions" in items:
        per_image = [json.loads(c) if c else [] for c in items["captions"]]
    elif "caption" in items:
        per_image = [[c] if c else [] for c in items["caption"]]
    else:
        return None
    texts = [t for caps in per_image for t in caps]
    owner = np.repeat(np.arange(len(per_image)), [len(c) for c in per_image])
    return (texts, owner) if texts else None


def evaluate_captions(store, encoder, *, ks: Sequence[int] = KS, batch_size: int = 256) -> dict | None:
    """Recall@k of ``store``'s captions (None when it has none), encoding them with ``encoder``."""
    found = index_captions(store)
    if found is None:
        return None
    texts, owner = found
    text_emb = np.concatenate([encoder.encode_texts(texts[i : i + batch_size])
                               for i in range(0, len(texts), batch_size)])
    result = caption_recall(np.asarray(store.embeddings, np.float32), text_emb, owner, ks)
    result["definition"] = "CLIP_benchmark zeroshot_retrieval; captions encoded as written"
    result["images_with_captions"] = int(len(np.unique(owner)))
    result["examples"] = caption_examples(np.asarray(store.embeddings, np.float32), text_emb, texts, owner)
    return result


def caption_examples(image_emb, text_emb, texts, owner, *, n: int = 3, k: int = 8) -> list[dict]:
    """A few captions (spread over the list) with their top ``k`` images, for the report's figures."""
    picks = sorted(set(np.linspace(0, len(texts) - 1, min(n, len(texts))).astype(int).tolist()))
    out = []
    for t in picks:
        scores = image_emb @ text_emb[t]
        top = np.lexsort((np.arange(len(scores)), -scores))[: min(k, len(scores))]
        out.append({"caption": texts[t], "image": int(owner[t]), "ids": top.tolist(),
                    "scores": [round(float(scores[i]), 6) for i in top]})
    return out
