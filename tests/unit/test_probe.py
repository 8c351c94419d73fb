"""Linear probe: the validation split comes from train only, C is chosen without the test set, numbers are right."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from cliplens.errors import ModelMismatchError
from cliplens.manifest import Manifest, ModelInfo
from cliplens.probe import ProbeConfig, ProbeError, check_compatible, compare, linear_probe, split_train_val

FAST = ProbeConfig(cs=(0.1, 10.0), refine=False)


def clusters(rng, per_class: int, num_classes: int = 4, dim: int = 8, spread: float = 0.3):
    """Unit vectors around num_classes orthogonal centres, labels in class order."""
    centres = np.eye(dim)[:num_classes]
    labels = np.repeat(np.arange(num_classes), per_class)
    x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_split_is_per_class_disjoint_seeded_and_limited():
    labels = np.repeat(np.arange(5), [10, 10, 10, 2, 1])
    tr, va = split_train_val(labels, val_fraction=0.2, limit_per_class=None, seed=0)
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    assert np.bincount(labels[va], minlength=5).tolist() == [2, 2, 2, 1, 0]  # a lone image stays in train
    tr2, va2 = split_train_val(labels, val_fraction=0.2, limit_per_class=None, seed=0)
    np.testing.assert_array_equal(va, va2)
    _, va3 = split_train_val(labels, val_fraction=0.2, limit_per_class=None, seed=1)
    assert not np.array_equal(va, va3)
    tr4, va4 = split_train_val(labels, val_fraction=0.5, limit_per_class=4, seed=0)
    assert np.bincount(labels[np.concatenate([tr4, va4])], minlength=5).tolist() == [4, 4, 4, 2, 1]
    assert np.bincount(labels[va4], minlength=5).tolist() == [2, 2, 2, 1, 0]


def test_probe_separates_clusters_and_never_looks_at_test(rng):
    x, y = clusters(rng, 30, spread=0.1)
    xt, yt = clusters(rng, 10, spread=0.1)
    a = linear_probe(x, y, xt, yt, num_classes=4, config=FAST)
    assert a["top1"] == 1.0 and a["top5"] == 1.0 and a["mean_per_class_accuracy"] == 1.0
    assert a["num_train"] + a["num_val"] == 120 and a["num_val"] == 24 and a["num_test"] == 40
    assert [s["C"] for s in a["sweep"]] == [0.1, 10.0] and a["best_C"] in (0.1, 10.0)
    # the same train data with a scrambled test set: identical sweep and C, only the test numbers move
    b = linear_probe(x, y, xt[::-1], rng.permutation(yt), num_classes=4, config=FAST)
    assert a["sweep"] == b["sweep"] and a["best_C"] == b["best_C"]
    assert b["top1"] < 0.6
    assert a["seconds"] == pytest.approx(a["sweep_seconds"] + a["fit_seconds"], abs=2e-3)


def test_refine_tries_half_decades_around_the_best(rng):
    x, y = clusters(rng, 20, spread=0.8)
    r = linear_probe(x, y, x[:8], y[:8], num_classes=4, config=ProbeConfig(cs=(1.0,), refine=True))
    assert [s["C"] for s in r["sweep"]] == pytest.approx([10**-0.5, 1.0, 10**0.5])


def test_class_missing_from_train_is_never_predicted(rng):
    x, y = clusters(rng, 10, num_classes=3)
    xt, yt = clusters(rng, 4, num_classes=4)  # class 3 exists only in the test set
    r = linear_probe(x, y, xt, yt, num_classes=4, config=FAST)
    assert r["per_class_accuracy"][3] == 0.0 and r["top1"] == pytest.approx(0.75)


def test_non_convergence_is_logged_not_raised(rng, caplog):
    x, y = clusters(rng, 10, spread=1.0)
    with caplog.at_level(logging.WARNING, logger="cliplens.probe"):
        linear_probe(x, y, x, y, num_classes=4, config=ProbeConfig(cs=(1e4,), refine=False, max_iter=1))
    assert "did not converge" in caplog.text


def test_compare_orders_gains():
    probe = np.array([0.9, 0.5, 0.8, np.nan])
    zs = np.array([0.1, 0.6, 0.8, 0.3])
    g = compare(probe, zs, ["a", "b", "c", "d"], n=2)
    assert [r["class"] for r in g["most"]] == ["a", "c"] and [r["class"] for r in g["least"]] == ["b", "c"]
    assert g["most"][0]["gain"] == pytest.approx(0.8)


def test_incompatible_indexes_and_bad_config():
    m = Manifest(count=2, embedding_dim=2, dtype="float32", model=ModelInfo(name="m", weights_sha256="aa"),
                 class_names=("x", "y"))
    check_compatible(m, replace(m))
    with pytest.raises(ModelMismatchError, match="same --model"):
        check_compatible(m, replace(m, model=ModelInfo(name="m", weights_sha256="bb")))
    with pytest.raises(ProbeError, match="same class names"):
        check_compatible(m, replace(m, class_names=("x", "z")))
    with pytest.raises(ProbeError):
        ProbeConfig(limit_per_class=1)
    with pytest.raises(ProbeError):
        ProbeConfig(cs=(0.0,))
    with pytest.raises(ProbeError, match="too small"):
        linear_probe(np.eye(2, dtype=np.float32), np.array([0, 1]), np.eye(2), np.array([0, 1]), num_classes=2)
