"""The on-disk cache of class text features, and both ensembling orders computed from one entry."""

from __future__ import annotations

import numpy as np
import pytest
from test_evaluate import NAMES, TEMPLATES, FakeEncoder, build_store, run

from cliplens.textcache import cache_key, class_text_features


def test_second_evaluation_reads_the_cache(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("\n".join(TEMPLATES))
    first, second = FakeEncoder(), FakeEncoder()
    _, a = run(tmp_path / "1", str(path), first, text_cache_dir=tmp_path / "cache")
    # single (1 template) and two.txt (2 templates), 6 classes, english + raw names
    assert len(first.raw_prompts) == 6 * (1 + 2) * 2
    _, b = run(tmp_path / "2", str(path), second, text_cache_dir=tmp_path / "cache")
    assert second.raw_prompts == []  # every class prompt came from disk
    assert sorted(second.texts) == sorted(first.texts)  # only the probe queries were encoded again
    assert [z["top1"] for z in a.zero_shot] == [z["top1"] for z in b.zero_shot]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # 2 template sets x 2 name styles
    assert not list((tmp_path / "cache").glob(".*tmp"))  # atomic writes leave no temporaries


def test_cache_key_changes_with_what_the_vectors_depend_on():
    info = FakeEncoder().info
    key = cache_key(info, NAMES, TEMPLATES)
    assert key == cache_key(info, list(NAMES), list(TEMPLATES))
    assert key != cache_key(info, NAMES[::-1], TEMPLATES)  # class order
    assert key != cache_key(info, NAMES, TEMPLATES[:1])  # templates
    assert key != cache_key(info, NAMES, ("a photo of a {}. ",) + TEMPLATES[1:])  # template text, one space
    assert key != cache_key(FakeEncoder(sha="1" * 64).info, NAMES, TEMPLATES)  # weights
    assert key != cache_key(info, NAMES, TEMPLATES, device="cuda:0")  # fp16 autocast on GPU
    assert cache_key(FakeEncoder(sha=None).info, NAMES, TEMPLATES) is None  # random weights: never cached


def test_hit_miss_and_damaged_file(tmp_path):
    enc = FakeEncoder()
    a = class_text_features(enc, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert not a.from_cache and len(enc.raw_prompts) == 12
    b = class_text_features(enc, NAMES, TEMPLATES, cache_dir=tmp_path)
    assert b.from_cache and len(enc.raw_prompts) == 12
    np.testing.assert_array_equal(a.features, b.features)
    class_text_features(enc, NAMES[:3], TEMPLATES, cache_dir=tmp_path)  # other classes: a miss
    assert len(enc.raw_prompts) == 18
    for f in tmp_path.glob("*.npz"):
        f.write_bytes(b"not a zip file")
    c = class_text_features(enc, NAMES, TEMPLATES, cache_dir=tmp_path)  # damaged: re-encoded, rewritten
    assert not c.from_cache and len(enc.raw_prompts) == 30
    assert class_text_features(enc, NAMES, TEMPLATES, cache_dir=tmp_path).from_cache
    no_sha = FakeEncoder(sha=None)
    class_text_features(no_sha, NAMES, TEMPLATES, cache_dir=tmp_path / "x")
    class_text_features(no_sha, NAMES, TEMPLATES, cache_dir=tmp_path / "x")
    assert len(no_sha.raw_prompts) == 24 and not (tmp_path / "x").exists()


def test_both_orders_from_raw_features(tmp_path):
    texts = class_text_features(FakeEncoder(), NAMES, TEMPLATES, cache=False)
    assert texts.raw and texts.features.shape == (6, 2, 16)
    # template 1: e_c (norm 1); template 2: 3 (e_c + e13) / sqrt 2 (norm 3)
    r = 1 / np.sqrt(2)
    nf = np.zeros(16)
    nf[0], nf[13] = 1 + r, r  # normalise each, then average: (e0 + (e0 + e13)/sqrt2) / 2
    af = np.zeros(16)
    af[0], af[13] = 1 + 3 * r, 3 * r  # average raw: (e0 + 3 (e0 + e13)/sqrt2) / 2
    np.testing.assert_allclose(texts.classifier("normalize-first")[0], nf / np.linalg.norm(nf), atol=1e-6)
    np.testing.assert_allclose(texts.classifier("average-first")[0], af / np.linalg.norm(af), atol=1e-6)
    assert not np.allclose(texts.classifier("normalize-first"), texts.classifier("average-first"))


class UnitOnly:
    """An encoder that gives only unit text vectors (no encode_texts_raw), like a minimal third-party one."""

    def __init__(self):
        self._fake = FakeEncoder()
        self.info = self._fake.info

    def encode_texts(self, prompts):
        return self._fake.encode_texts(prompts)


def test_unit_only_encoder_makes_orders_coincide(tmp_path):
    enc = UnitOnly()
    texts = class_text_features(enc, NAMES, TEMPLATES, cache=False)
    assert not texts.raw
    np.testing.assert_allclose(texts.classifier("normalize-first"), texts.classifier("average-first"), atol=1e-6)
    path = tmp_path / "two.txt"
    path.write_text("\n".join(TEMPLATES))
    store = build_store(tmp_path / "index")
    from cliplens.evaluate import EvalConfig, evaluate_index

    report = evaluate_index(store, UnitOnly(), EvalConfig(template_sets=(str(path),), case_studies=(), text_cache=False))
    assert any("average-first equals normalize-first" in n for n in report.notes)


def test_real_encoder_raw_features_normalise_to_encode_texts(tiny_encoder):
    prompts = ["a photo of a tulip.", "a photo of a tractor, a big one."]
    raw = tiny_encoder.encode_texts_raw(prompts)
    unit = tiny_encoder.encode_texts(prompts)
    assert raw.dtype == np.float32 and raw.shape == unit.shape
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)
    assert tiny_encoder.encode_texts_raw([]).shape == (0, unit.shape[1])


@pytest.mark.parametrize("order", ["normalize-first", "average-first"])
def test_normalize_first_matches_open_clip_style_reference(tiny_encoder, order):
    """normalize-first == open_clip's build_zero_shot_classifier rule: encode normalised, mean, renormalise."""
    names, templates = ("tulip", "sweet pepper"), ("a photo of a {}.", "a blurry photo of the {}.", "art of the {}.")
    texts = class_text_features(tiny_encoder, names, templates, cache=False)
    unit = tiny_encoder.encode_texts([t.replace("{}", n) for n in names for t in templates]).reshape(2, 3, -1)
    raw = tiny_encoder.encode_texts_raw([t.replace("{}", n) for n in names for t in templates]).reshape(2, 3, -1)
    ref = unit.mean(axis=1) if order == "normalize-first" else raw.mean(axis=1)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(texts.classifier(order), ref, atol=1e-5)
