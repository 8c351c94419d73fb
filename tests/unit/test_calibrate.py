"""The calibrated threshold: precision/recall worked out by hand, recorded per model, found again by lookup."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplens.calibrate import CalibrationError, calibrate, lookup, pr_curve, record
from cliplens.manifest import ModelInfo


def test_pr_curve_by_hand_with_a_tie():
    # scores 0.9 (rel), 0.8 (not), 0.8 (rel), 0.5 (rel), 0.1 (not): thresholds 0.9, 0.8, 0.5, 0.1
    c = pr_curve(np.array([0.5, 0.8, 0.9, 0.1, 0.8]), np.array([1, 0, 1, 0, 1]))
    np.testing.assert_allclose(c["threshold"], [0.9, 0.8, 0.5, 0.1])
    np.testing.assert_allclose(c["precision"], [1, 2 / 3, 3 / 4, 3 / 5])  # a tie group counts whole
    np.testing.assert_allclose(c["recall"], [1 / 3, 2 / 3, 1, 1])


def test_threshold_is_the_lowest_score_reaching_the_target():
    # two classes on axes e0, e1; images: 4 of class 0 and 4 of class 1 with known cosines to their own axis
    own = np.array([0.9, 0.7, 0.5, 0.3])
    emb = []
    for axis in (0, 1):
        for s in own:
            v = np.zeros(3)
            v[axis], v[2] = s, np.sqrt(1 - s * s)
            emb.append(v)
    emb = np.array(emb, np.float32)
    labels = np.repeat([0, 1], 4)
    text = np.eye(3, dtype=np.float32)[:2]
    r = calibrate(emb, labels, text, target=0.9)
    # every relevant pair scores s > 0 and every irrelevant pair exactly 0: precision is 1 down to 0.3
    assert r["threshold"] == pytest.approx(0.3) and r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["pairs"] == 16 and r["queries"] == 2
    text2 = np.array([[1, 0.6, 0], [0, 1, 0]], np.float32)  # class 0's prompt also likes class 1's images
    text2 /= np.linalg.norm(text2, axis=1, keepdims=True)
    r2 = calibrate(emb, labels, text2, target=1.0)
    # class-0 query scores its own images 0.857*s and class 1's images 0.514*s; class-1 query: s on its own
    # pairs above the first wrong one (0.514*0.9 = 0.463): 0.9, 0.771 (0.857*.9), 0.7, 0.6 (.857*.7), 0.5
    assert r2["threshold"] == pytest.approx(0.5, abs=1e-6) and r2["recall"] == pytest.approx(5 / 8)
    assert calibrate(emb, labels, -text, target=0.9)["threshold"] is None  # never reached: said, not faked


def test_recorded_per_weights_and_template_and_looked_up(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path))
    model = ModelInfo(name="m", pretrained="p", weights_sha256="ab" * 32)
    path = record(model, "a photo of a {}.", {"threshold": 0.25, "precision": 0.9}, index="/x")
    record(model, "{}", {"threshold": 0.3, "precision": 0.91}, index="/y")
    assert path == tmp_path / "calibration" / f"{'ab' * 32}.json"
    data = json.loads(path.read_text())
    assert set(data["templates"]) == {"a photo of a {}.", "{}"}
    assert lookup(model, "a photo of a {}.")["threshold"] == 0.25
    with pytest.raises(CalibrationError, match="calibrated: 'a photo of a {}.', '{}'"):
        lookup(model, "a sketch of a {}.")
    with pytest.raises(CalibrationError, match="run `cliplens calibrate"):
        lookup(ModelInfo(name="other", weights_sha256="cd" * 32), "{}")
    with pytest.raises(CalibrationError, match="no weights sha256"):
        record(ModelInfo(name="random"), "{}", {"threshold": 0.1}, index="/z")
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="unreadable"):
        lookup(model, "{}")
