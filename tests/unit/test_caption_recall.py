"""Caption retrieval recall@k (CLIP_benchmark's definitions) against a brute-force computation, and through
`cliplens evaluate` on a captioned image list."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cliplens.caption_recall import caption_recall
from cliplens.cli import main
from cliplens.store import IndexStore


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(images, texts, owner, k):
    """Straight from the definitions, one query at a time, in float64."""
    s = texts.astype(np.float64) @ images.astype(np.float64).T
    t2i = np.mean([owner[t] in sorted(range(len(images)), key=lambda i: -s[t, i])[:k] for t in range(len(texts))])
    captioned = sorted(set(owner.tolist()))
    i2t = np.mean([any(owner[t] == i for t in sorted(range(len(texts)), key=lambda t: -s[t, i])[:k])
                   for i in captioned])
    return t2i, i2t


def test_a_hand_made_case():
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]], np.float32)  # caption 1 is closer to image 2
    owner = np.array([0, 1, 2])
    r = caption_recall(images, texts, owner, ks=(1, 2))
    assert r["text_to_image_recall@1"] == pytest.approx(1 / 3) and r["text_to_image_recall@2"] == 1.0
    assert r["image_to_text_recall@1"] == pytest.approx(1 / 3) and r["image_to_text_recall@2"] == 1.0


def test_matches_brute_force_with_several_captions_and_uncaptioned_images(rng):
    images, texts = _unit(rng, 40, 8), _unit(rng, 90, 8)
    owner = rng.integers(0, 30, size=90)  # images 30..39 (and any not drawn) have no caption
    texts[:30] = _unit(rng, 30, 8) * 0.3 + images[owner[:30]]  # some captions close to their image
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    r = caption_recall(images, texts, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = brute_force(images, texts, owner, k)
        assert r[f"text_to_image_recall@{k}"] == pytest.approx(t2i, abs=1e-12)
        assert r[f"image_to_text_recall@{k}"] == pytest.approx(i2t, abs=1e-12)
    assert 0 < r["text_to_image_recall@1"] < r["text_to_image_recall@10"] <= 1


def test_bad_pairs_are_refused(rng):
    with pytest.raises(ValueError, match="image row"):
        caption_recall(_unit(rng, 3, 4), _unit(rng, 2, 4), np.array([0, 3]))


@pytest.mark.parametrize("labelled", [False, True])
def test_evaluate_reports_caption_recall(labelled, tmp_path, tiny_model, tiny_encoder, rng, capsys):
    root = tmp_path / "shop"
    root.mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"p{i:02d}.png")
        for c in range(1 + i % 3):  # 1 to 3 captions per image
            rows.append({"path": f"p{i:02d}.png", "caption": f"product {i} view {c}", "label": f"kind{i % 4}"})
    if not labelled:
        rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    (root / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "idx"
    assert main(["index", "list", str(root / "list.jsonl"), "--index-dir", str(out), "--model", tiny_model,
                 "--device", "cpu", "-q"]) == 0
    argv = ["evaluate", "--index-dir", str(out), "--out", str(tmp_path / "report"), "-q", "--templates", "single",
            "-k", "1,5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text -> image" in printed and "image -> text" in printed
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    c = metrics["caption_retrieval"]
    store = IndexStore.open(out)
    texts = [r["caption"] for r in sorted(rows, key=lambda r: r["path"])]
    owner = np.array([int(r["path"][1:3]) for r in sorted(rows, key=lambda r: r["path"])])
    text_emb = tiny_encoder.encode_texts(texts)
    for k in (1, 5, 10):
        t2i, i2t = brute_force(np.asarray(store.embeddings), text_emb, owner, k)
        assert c[f"text_to_image_recall@{k}"] == pytest.approx(t2i, abs=1e-9)
        assert c[f"image_to_text_recall@{k}"] == pytest.approx(i2t, abs=1e-9)
    assert (c["captions"], c["images_with_captions"]) == (len(rows), 12)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Caption retrieval" in md and ("## Zero-shot classification" in md) == labelled
    assert "text to image" in (tmp_path / "report" / "report.html").read_text()
