"""Suspect labels and near-duplicates on constructed embeddings: the labels flipped on purpose are found first."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.suspects import copy_threshold, find_suspects, near_duplicates, nearest, precision_at

C, D = 6, 12


def clusters(rng, per_class: int, spread: float = 0.15):
    labels = np.repeat(np.arange(C), per_class)
    x = np.eye(D)[labels] + spread * rng.normal(size=(len(labels), D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


FLIPPED = {3: 4, 17: 0, 25: 1, 44: 2, 58: 0}  # item id -> the wrong label written on it


def flipped_index(rng):
    x, true = clusters(rng, 10)
    given = true.copy()
    for i, wrong in FLIPPED.items():
        assert wrong != true[i]
        given[i] = wrong
    return x, true, given


@pytest.mark.parametrize("with_train", [False, True])
def test_flipped_labels_are_found_first_with_the_right_suggestion(rng, with_train):
    x, true, given = flipped_index(rng)
    text = np.eye(D)[:C].astype(np.float32)
    ref = clusters(rng, 20) if with_train else (None, None)
    out = find_suspects(x, given, text, num_classes=C, ref_emb=ref[0], ref_labels=ref[1])
    top = out["ranked"][:len(FLIPPED)]
    assert set(top.tolist()) == set(FLIPPED)
    assert len(out["ranked"]) == len(FLIPPED)  # every other label agrees with CLIP and its neighbours
    for i in top:
        assert out["suggested"][i] == true[i] and out["zero_shot_pred"][i] == true[i]
    # self-confidence of a flipped item: p_zs of a wrong class is tiny and no neighbour shares its label
    assert np.all(out["self_confidence"][top] < 0.05)
    assert out["neighbours_from"] == ("train index" if with_train else "same index")
    assert precision_at(out["ranked"], np.array([3, 17, 99]), ns=(5,)) == {"5": 0.4}  # 2 of the top 5


def test_precision_at_counts_the_reference_hits():
    ranked = np.array([5, 9, 2, 7])
    assert precision_at(ranked, np.array([9, 7, 100]), ns=(1, 2, 4, 10)) == {"1": 0.0, "2": 0.5, "4": 0.5, "10": 0.5}
    assert precision_at(np.array([], np.int64), np.array([1]), ns=(5,)) == {"5": None}


def test_nearest_excludes_self_and_breaks_ties_by_id():
    base = np.eye(3, dtype=np.float32)[[0, 0, 1, 2]]  # ids 0 and 1 identical
    s, ids = nearest(base, base, 2, exclude_self=True)
    assert ids[0, 0] == 1 and ids[1, 0] == 0 and s[0, 0] == 1.0
    s, ids = nearest(base[:1], base, 2)
    assert ids[0].tolist() == [0, 1]


def test_near_duplicates_lists_the_planted_copies(rng):
    train, _ = clusters(rng, 10, spread=0.5)
    test, _ = clusters(rng, 5, spread=0.5)
    planted = {4: 11, 20: 50}
    for t, s in planted.items():
        v = train[s] + 0.01 * rng.normal(size=D)
        test[t] = v / np.linalg.norm(v)
    out = near_duplicates(test, train, threshold=0.99)
    assert {p["test_id"]: p["train_id"] for p in out["pairs"]} == planted
    assert out["count"] == 2 and out["share"] == pytest.approx(2 / 30)


class PoolEncoder:
    """Embeds an image as its 4x4 mean-pooled grey levels, centred and normalised: copies stay close."""

    def encode_images(self, images):
        out = []
        for im in images:
            a = np.asarray(im.convert("L").resize((4, 4)), np.float64).ravel()
            a = a - a.mean()
            out.append(a / (np.linalg.norm(a) + 1e-9))
        return np.array(out, np.float32)


def test_copy_threshold_is_measured_on_reencoded_copies(rng):
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(images[:, ::8, ::8], 8, axis=1), 8, axis=2)  # blocky: survives JPEG
    r = copy_threshold(PoolEncoder(), images, sample=30)
    assert r["sample"] == 30 and r["copy_cosine_min"] <= r["threshold"] <= r["copy_cosine_median"] <= 1.0
    assert r["threshold"] > 0.8  # copies of the same picture stay close; distinct noise images do not
    assert r == copy_threshold(PoolEncoder(), images, sample=30)  # seeded


def test_copy_threshold_takes_the_originals_embeddings_it_is_given(rng):
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    images = np.repeat(np.repeat(images[:, ::8, ::8], 8, axis=1), 8, axis=2)
    from PIL import Image

    class Counting(PoolEncoder):
        seen = 0

        def encode_images(self, images):
            images = list(images)
            Counting.seen += len(images)
            return super().encode_images(images)

    emb = PoolEncoder().encode_images([Image.fromarray(a) for a in images])
    encoder = Counting()
    given = copy_threshold(encoder, images, sample=24, embeddings=emb)
    assert Counting.seen == 24  # the copies only
    assert given == copy_threshold(PoolEncoder(), images, sample=24)  # the same measure
    with pytest.raises(ValueError, match="3 embeddings for 24 images"):
        copy_threshold(encoder, images, sample=24, embeddings=emb[:3])
