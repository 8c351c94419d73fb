"""Few-shot study on constructed embeddings whose answers are known, and the identities the protocol promises.

Five classes around orthogonal axes e0..e4 of R^8. The text classifier is right for classes 2..4 and gives classes
0 and 1 the *same* vector (e0 + e1)/sqrt(2): every image of class 0 or 1 then ties between them, ties go to the
higher index (class 1), so zero-shot gets class 0 wrong and everything else right: top-1 = 4/5 exactly. Any labelled
shot of class 0 breaks that tie, so the few-shot methods should reach 100%.
"""

from __future__ import annotations

import numpy as np
import pytest

from cliplens import adapters as A
from cliplens.evaluate import zero_shot
from cliplens.fewshot import FewShotConfig, FewShotError, run_fewshot, run_method, sample_shots
from cliplens.probe import ProbeConfig, linear_probe

C, D = 5, 8


def clusters(rng, per_class: int, spread: float = 0.1):
    labels = np.repeat(np.arange(C), per_class)
    x = np.eye(D)[labels] + spread * rng.normal(size=(len(labels), D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def text_classifier() -> np.ndarray:
    w = np.eye(D)[:C].copy()
    w[0] = w[1] = (np.eye(D)[0] + np.eye(D)[1]) / np.sqrt(2)
    return w.astype(np.float32)


FAST = FewShotConfig(shots=(1, 4, None), seeds=2, probe=ProbeConfig(cs=(0.1, 10.0), refine=False),
                     adapters=A.AdapterConfig(betas=(1.0, 5.0), alphas=(0.5, 1.0), finetune_steps=5, probe_steps=10))


def test_sampling_is_seeded_per_class_and_all_means_all():
    labels = np.repeat(np.arange(4), [6, 6, 6, 2])
    a, b, c = sample_shots(labels, 3, 0), sample_shots(labels, 3, 0), sample_shots(labels, 3, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 2]  # a class with fewer keeps all it has
    assert np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(sample_shots(labels, None, 7), np.arange(20))


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly(rng):
    x, y = clusters(rng, 30, spread=0.6)  # noisy: many near-ties, the hard case for exactness
    w = rng.normal(size=(C, D)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    keys, ky = clusters(rng, 3)
    logits = A.tip_logits(x, w, keys, A.one_hot(ky, C), alpha=0.0, beta=5.5)
    zs = zero_shot(x, w, y, None)
    pred = logits.shape[1] - 1 - np.argmax(logits[:, ::-1], axis=1)
    np.testing.assert_array_equal(pred, zs["pred"])
    from cliplens.metrics import topk_accuracy

    assert topk_accuracy(logits, y, 1) == zs["top1"] and topk_accuracy(logits, y, 5) == zs["top5"]
    np.testing.assert_array_equal(A.blend_logits(x, w, rng.normal(size=(C, D)), 0.0), logits)  # blend 0 too


def test_hand_written_gradients_match_finite_differences(rng):
    x, y = clusters(rng, 2, spread=0.3)
    w = text_classifier()
    keys = x[::2].astype(np.float64) + 0.01 * rng.normal(size=x[::2].shape)
    values = A.one_hot(y[::2], C)
    for fn, param in ((lambda k: A.tip_key_grad(k, x, y, w, values, alpha=1.3, beta=4.0), keys),
                      (lambda v: A.probe_grad(v, x, y, w.astype(np.float64), 0.7), w.astype(np.float64) * 0.9)):
        _, g = fn(param)
        eps = 1e-6
        for idx in [(0, 0), (1, 3), (2, 7)]:
            up, down = param.copy(), param.copy()
            up[idx] += eps
            down[idx] -= eps
            numeric = (fn(up)[0] - fn(down)[0]) / (2 * eps)
            assert g[idx] == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_known_answers_zero_shot_four_fifths_and_shots_fix_the_tie(rng):
    x, y = clusters(rng, 20)
    xt, yt = clusters(rng, 10)
    out = run_fewshot(x, y, xt, yt, text_classifier(), num_classes=C, config=FAST)
    assert out["zero_shot"]["top1"] == pytest.approx(4 / 5)
    cell = {(r["method"], r["shots"]): r for r in out["rows"]}
    assert ("tip-adapter", "all") not in cell and ("tip-adapter-f", "all") not in cell  # caches are few-shot only
    assert cell["probe", "all"]["seeds"] == 1 and cell["probe", "4"]["seeds"] == 2
    for method in ("probe", "tip-adapter", "tip-adapter-f", "zs-probe"):
        assert cell[method, "4"]["mean"] == 1.0, method  # one labelled class-0 shot breaks the tie
        assert out["crossover"][method] in ("1", "4")
    # 1 shot: no validation split, the documented defaults are used and said to be
    assert cell["tip-adapter", "1"]["runs"][0]["params"] == {"validated": False, "alpha": 1.0, "beta": 5.5}
    assert cell["tip-adapter", "1"]["mean"] == 1.0
    assert all(r["params"]["validated"] for r in cell["probe", "4"]["runs"])


def test_shots_all_probe_equals_the_probe_command(rng):
    x, y = clusters(rng, 15, spread=0.5)
    xt, yt = clusters(rng, 10, spread=0.5)
    pc = ProbeConfig(cs=(0.3,), refine=False)
    cfg = FewShotConfig(shots=(None,), methods=("probe",), val_fraction=0.2, probe=pc)
    out = run_fewshot(x, y, xt, yt, text_classifier(), num_classes=C, config=cfg)
    direct = linear_probe(x, y, xt, yt, num_classes=C, config=pc)  # what `cliplens probe --cs 0.3` runs
    row = out["rows"][0]
    assert row["shots"] == "all" and row["mean"] == direct["top1"] and row["runs"][0]["params"]["C"] == 0.3
    assert 0.3 < direct["top1"] < 1.0  # a real number, not a trivial one


def test_nothing_chosen_depends_on_the_test_set(rng):
    x, y = clusters(rng, 12, spread=0.4)
    xt, yt = clusters(rng, 6, spread=0.4)
    a = run_fewshot(x, y, xt, yt, text_classifier(), num_classes=C, config=FAST)
    b = run_fewshot(x, y, xt[::-1] * -1, rng.permutation(yt), text_classifier(), num_classes=C, config=FAST)
    for ra, rb in zip(a["rows"], b["rows"]):
        assert [r["params"] for r in ra["runs"]] == [r["params"] for r in rb["runs"]]
        assert [r["num_shots"] for r in ra["runs"]] == [r["num_shots"] for r in rb["runs"]]


def test_run_method_zero_shot_is_the_same_for_any_shots(rng):
    x, y = clusters(rng, 4)
    xt, yt = clusters(rng, 5)
    r = run_method("zero-shot", x, y, xt, yt, text_classifier(), num_classes=C, seed=0, config=FAST)
    assert r["top1"] == pytest.approx(0.8)


@pytest.mark.parametrize("kw", [{"methods": ("magic",)}, {"shots": (0,)}, {"seeds": 0}, {"val_fraction": 1.0}])
def test_bad_options_are_refused(kw):
    with pytest.raises(FewShotError):
        FewShotConfig(**kw)
