"""End to end on an index whose right answers are known: embeddings and text vectors built by hand.

Six classes in three superclasses; every vector lives on one class axis (e0..e5) plus a filler axis (e15), so an
item's score for a class is exactly its strength s on that axis, or exactly 0. Two items are deliberately placed on
the wrong axis: an apple on the pear axis (same superclass) and a seal on the tractor axis (another superclass).
Every number asserted below is worked out by hand in the comments.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliplens.encoder import ModelInfo
from cliplens.evaluate import CaseStudy, EvalConfig, EvaluationError, evaluate_index, predict, zero_shot
from cliplens.report import write_report
from cliplens.store import IndexStore, IndexWriter

NAMES = ("apple", "sweet_pepper", "seal", "otter", "tractor", "tank")  # one underscore: english != raw
SUPER = ("fruit_and_vegetables", "aquatic_mammals", "vehicles")
F2C = (0, 0, 1, 1, 2, 2)
DIM, FILLER = 16, 15
# (label, axis it is placed on, strength s on that axis), in id order
ITEMS = (
    (0, 0, 0.9), (0, 0, 0.8), (0, 1, 0.95),  # id 2: an apple placed on the sweet-pepper axis
    (1, 1, 0.9), (1, 1, 0.7), (1, 1, 0.6),
    (2, 2, 0.9), (2, 2, 0.5), (2, 4, 0.85),  # id 8: a seal placed on the tractor axis
    (3, 3, 0.9), (3, 3, 0.8), (3, 3, 0.7),
    (4, 4, 0.9), (4, 4, 0.8), (4, 4, 0.7),
    (5, 5, 0.9), (5, 5, 0.8), (5, 5, 0.7),
)
TEMPLATES = ("a photo of a {}.", "a sketch of a {}.")
PROBES = {"a seal": 2, "a wax seal on a letter": 4, "a tank": 5}  # probe query -> axis of its vector


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1
    return v


class FakeEncoder:
    """Known vectors for known prompts; raises on anything else, and counts what it encodes."""

    def __init__(self, sha: str | None = "f" * 64):
        self.info = ModelInfo(name="fake-clip", pretrained=None, weights_path=None, weights_sha256=sha, embed_dim=DIM,
                              image_size=224, context_length=77, quick_gelu=False, preprocess="none", precision="exact")
        self.device = "cpu"
        self.raw_prompts: list[str] = []
        self.texts: list[str] = []

    def _raw(self, prompt: str) -> np.ndarray:
        if prompt in PROBES:
            return axis(PROBES[prompt])
        for c, name in enumerate(NAMES):
            for spelling in {name, name.replace("_", " ")}:
                if prompt == TEMPLATES[0].replace("{}", spelling):
                    return axis(c)  # norm 1
                if prompt == TEMPLATES[1].replace("{}", spelling):
                    return 3 * (axis(c) + axis(13)) / np.sqrt(2)  # norm 3, off towards e13 (no image uses e13)
        raise KeyError(f"the fake encoder does not know {prompt!r}")

    def encode_texts_raw(self, prompts):
        self.raw_prompts += list(prompts)
        return np.stack([self._raw(p) for p in prompts]).astype(np.float32)

    def encode_texts(self, prompts):
        self.texts += list(prompts)
        v = np.stack([self._raw(p) for p in prompts])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def build_store(root, *, images: bool = False, sha: str | None = "f" * 64, superclasses: bool = True) -> IndexStore:
    x = np.stack([s * axis(p) + np.sqrt(1 - s * s) * axis(FILLER) for _, p, s in ITEMS]).astype(np.float32)
    labels = np.array([lab for lab, _, _ in ITEMS], np.int64)
    writer = IndexWriter(root=root, identity={"count": len(x), "dtype": "float32", "source": "constructed"}, dim=DIM)
    writer.start()
    writer.write(0, x)
    writer.checkpoint(len(x))
    items = {"id": np.arange(len(x)), "ref": [f"item-{i}" for i in range(len(x))], "label": labels,
             "label_name": [NAMES[i] for i in labels]}
    if superclasses:
        items.update(superclass=np.array([F2C[i] for i in labels]), superclass_name=[SUPER[F2C[i]] for i in labels])
    thumbs = np.random.default_rng(0).integers(0, 256, (len(x), 32, 32, 3), dtype=np.uint8) if images else None
    writer.finalize(items=items, images=thumbs, manifest={
        "model": dict(FakeEncoder(sha).info.__dict__), "source": {"name": "constructed", "split": "test"},
        "class_names": list(NAMES), "superclass_names": list(SUPER) if superclasses else None,
        "fine_to_coarse": list(F2C) if superclasses else None})
    return IndexStore.open(root)


@pytest.fixture
def template_file(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return str(path)


def run(tmp_path, template_file, encoder=None, **kw):
    store = build_store(tmp_path / "index")
    studies = (CaseStudy("seal", ("a seal", "a wax seal on a letter")), CaseStudy("tractor", ("a tank",)),
               CaseStudy("tulip", ("a tulip",)))
    kw.setdefault("text_cache_dir", tmp_path / "textcache")
    config = EvalConfig(template_sets=("single", template_file), ks=(1, 2, 3, 5), case_studies=studies, **kw)
    return store, evaluate_index(store, encoder or FakeEncoder(), config)


def test_zero_shot_numbers_by_hand(tmp_path, template_file):
    _, report = run(tmp_path, template_file)
    rows = {(z["templates"], z["classnames"], z["ensemble"]): z for z in report.zero_shot}
    assert len(rows) == 2 * 2 * 2  # template sets x class-name styles x ensembling orders
    for z in rows.values():
        # Every item is predicted as the axis it sits on: 16 of 18 right, the two misplaced ones wrong.
        assert z["top1"] == pytest.approx(16 / 18)
        # Top-5 of 6 classes: the misplaced apple's true class scores 0, tied with classes 2..5, which rank before
        # it (ties go to the higher index), so it is 6th; the seal's true class (2) ties only with 3 and 5: 3rd.
        assert z["top5"] == pytest.approx(17 / 18)
        assert z["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 + 2 / 3 + 1 + 1 + 1) / 6)
        assert z["within_superclass_error_share"] == pytest.approx(0.5)  # apple->pepper inside, seal->tractor not
    assert {z["num_templates"] for z in rows.values()} == {1, 2}
    p = report.per_template["two.txt"]
    cm = np.asarray(p["confusion"])
    expected = np.diag([2, 3, 2, 3, 3, 3])
    expected[0, 1] = expected[2, 4] = 1
    np.testing.assert_array_equal(cm, expected)
    np.testing.assert_array_equal(p["superclass_confusion"], [[6, 0, 0], [0, 5, 1], [0, 0, 6]])
    np.testing.assert_allclose(p["per_class_recall"], [2 / 3, 1, 2 / 3, 1, 1, 1])
    assert report.primary == {"templates": "two.txt", "classnames": "english", "ensemble": "normalize-first",
                              "case_study_ensemble": "two.txt"}
    assert report.templates["two.txt"] == list(TEMPLATES) and report.templates["single"] == ["a photo of a {}."]


def test_retrieval_numbers_by_hand(tmp_path, template_file):
    _, report = run(tmp_path, template_file)
    for lab in ("single", "two.txt"):  # the e13 part of the ensembled class vectors touches no image
        r = report.per_template[lab]["retrieval"]
        per = r["per_class"]
        # apple query: ids 0, 1 (scores .9, .8), then 16 items tied at 0 in id order, of which id 2 is an apple.
        # sweet pepper: the misplaced apple (.95) first, then ids 3, 4, 5. seal: ids 6, 7, then the tie group, which
        # holds id 8. otter, tank: their three. tractor: id 12, the misplaced seal (.85), ids 13, 14.
        np.testing.assert_allclose(per["precision@1"], [1, 0, 1, 1, 1, 1])
        np.testing.assert_allclose(per["precision@2"], [1, 0.5, 1, 1, 0.5, 1])
        np.testing.assert_allclose(per["precision@3"], [1, 2 / 3, 2 / 3, 1, 2 / 3, 1])
        np.testing.assert_allclose(per["precision@5"], [3 / 5, 3 / 5, 2 / 5, 3 / 5, 3 / 5, 3 / 5])
        np.testing.assert_allclose(per["r_precision"], [1, 2 / 3, 2 / 3, 1, 2 / 3, 1])
        # AP counts a tie group as one threshold: an apple found at the end of the 16-item tie group (position 18)
        # contributes 3/18. apple (1 + 1 + 3/18)/3; pepper (1/2 + 2/3 + 3/4)/3; tractor (1 + 2/3 + 3/4)/3.
        ap = [13 / 18, 23 / 36, 13 / 18, 1, 29 / 36, 1]
        np.testing.assert_allclose(per["ap"], ap)
        assert r["summary"]["mAP"] == pytest.approx(22 / 27)
        assert r["summary"]["mean_precision@2"] == pytest.approx(5 / 6)
        # False positives of the top k and whether they share the query's superclass:
        # k=1: only the pepper query's misplaced apple (same superclass) -> 1/1.
        # k=2: that apple, and the seal in the tractor query (other superclass) -> 1/2.
        # k=3: + an apple (id 0) third in the seal query (other superclass) -> 1/3.
        fp = r["superclass_fp_share"]
        assert fp[1] == pytest.approx(1.0) and fp[2] == pytest.approx(0.5) and fp[3] == pytest.approx(1 / 3)
        per_q = r["superclass_fp_share_per_class"][2]
        np.testing.assert_allclose(per_q, [np.nan, 1, np.nan, np.nan, 0, np.nan])


def test_case_studies_by_hand(tmp_path, template_file):
    encoder = FakeEncoder()
    _, report = run(tmp_path, template_file, encoder)
    seal, tractor, tulip = report.case_studies
    assert tulip == {"class": "tulip", "skipped": "the index has no class named 'tulip'"}
    assert "a tulip" not in encoder.texts  # a skipped study encodes nothing
    # seal query ranks ids 6, 7, then 0..5, 8, 9: three seals in the top 10; k=100 is clipped to the 18 items.
    assert seal["k10"] == 10 and seal["k100"] == 18
    for variant in ("single", "ensembled"):
        assert seal[variant] == pytest.approx({"precision@10": 0.3, "precision@100": 3 / 18})
        assert tractor[variant] == pytest.approx({"precision@10": 0.3, "precision@100": 3 / 18})
    # zero-shot: the misplaced seal is classified as a tractor, in another superclass
    assert seal["misclassified_as"] == [{"class": "tractor", "count": 1, "same_superclass": False}]
    assert tractor["mistaken_for_it"] == [{"class": "seal", "count": 1, "same_superclass": False}]
    assert seal["mistaken_for_it"] == [] and tractor["misclassified_as"] == []
    # probes: "a wax seal on a letter" sits on the tractor axis: ids 12, 8, 13, 14, then 0..5 -> one seal in 10.
    probes = {p["query"]: p for p in seal["probes"]}
    assert probes["a seal"]["precision@10"] == pytest.approx(0.3)
    assert probes["a wax seal on a letter"]["precision@10"] == pytest.approx(0.1)
    assert tractor["probes"][0]["precision@10"] == 0.0  # "a tank": ids 15..17 then 0..6, no tractor
    assert all(p["precision@100"] == pytest.approx(3 / 18) for p in seal["probes"])
    np.testing.assert_array_equal(seal["grid"]["ids"], [6, 7, 0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15])
    np.testing.assert_array_equal(seal["grid"]["match"], [1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    assert sorted(encoder.texts) == sorted(["a seal", "a wax seal on a letter", "a tank"])


def test_both_name_styles_and_orders_are_encoded(tmp_path, template_file):
    encoder = FakeEncoder()
    run(tmp_path, template_file, encoder)
    assert "a sketch of a sweet pepper." in encoder.raw_prompts and "a sketch of a sweet_pepper." in encoder.raw_prompts
    _, only = run(tmp_path / "b", template_file, FakeEncoder(), classname_styles=("raw",), orders=("average-first",))
    assert [(z["classnames"], z["ensemble"]) for z in only.zero_shot] == [("raw", "average-first")] * 2
    assert only.primary["classnames"] == "raw" and only.primary["ensemble"] == "average-first"


def test_report_files_from_constructed_index(tmp_path, template_file):
    store, report = run(tmp_path, template_file)
    paths = write_report(report, tmp_path / "report", ks=(1, 2, 3, 5), images=None, json_path=tmp_path / "m.json")
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert metrics["manifest"]["model"]["name"] == "fake-clip"
    assert metrics["templates"]["two.txt"] == list(TEMPLATES)
    assert metrics["per_template"]["two.txt"]["retrieval"]["summary"]["mAP"] == pytest.approx(22 / 27)
    assert metrics["per_template"]["single"]["retrieval"]["superclass_fp_share_per_class"]["2"][0] is None  # nan
    assert {a["value"] for a in metrics["published"]["anchors"]} == {0.651, 0.645, 0.642, 0.80}
    md = paths["markdown"].read_text()
    assert "| two.txt | 2 | english | normalize-first | 88.9% | 94.4% | 88.9% | 50.0% |" in md
    assert "published: zero-shot top-1 | 65.1% | CLIP paper" in md
    assert "fake-clip" in md and "Skipped: the index has no class named 'tulip'." in md
    for key in ("template_comparison", "superclass_confusion", "per_class_ap"):
        assert (tmp_path / "report" / "figures" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html


def test_predict_breaks_ties_like_topk_accuracy():
    logits = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]])
    np.testing.assert_array_equal(predict(logits), [1, 2, 2])
    zs = zero_shot(np.eye(3), logits.T, np.array([1, 2, 2]), None)  # image i's logits are row i
    assert zs["top1"] == 1.0 and zs["within_superclass_error_share"] is None


def test_refuses_bad_input(tmp_path, template_file):
    store = build_store(tmp_path / "index")
    with pytest.raises(EvaluationError, match="class-name style"):
        EvalConfig(classname_styles=("latin",))
    with pytest.raises(EvaluationError, match="template set or file not found"):
        evaluate_index(store, FakeEncoder(), EvalConfig(template_sets=("single", str(tmp_path / "nope.txt"))))
    from cliplens.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError):
        evaluate_index(store, FakeEncoder(sha="0" * 64), EvalConfig(template_sets=("single",)))


def test_index_without_superclasses_or_thumbnails(tmp_path, template_file):
    """CIFAR-10-like: no superclasses, so those numbers are absent, not wrong; the report still renders."""
    store = build_store(tmp_path / "index", superclasses=False)
    config = EvalConfig(template_sets=(template_file,), case_studies=(CaseStudy("seal", ("a seal",)),),
                        text_cache=False, ks=(1, 3))
    report = evaluate_index(store, FakeEncoder(), config)
    assert report.zero_shot[0]["top1"] == pytest.approx(16 / 18)
    assert report.zero_shot[0]["within_superclass_error_share"] is None
    p = report.per_template["two.txt"]
    assert p["superclass_confusion"] is None and p["retrieval"]["superclass_fp_share"] == {}
    assert report.case_studies[0]["misclassified_as"] == [{"class": "tractor", "count": 1, "same_superclass": None}]
    paths = write_report(report, tmp_path / "report", ks=(1, 3), images=store.images())
    assert store.images() is None
    md = paths["markdown"].read_text()
    assert "superclass_confusion" not in md and "| n/a |" in md
    with pytest.raises(EvaluationError, match="no thumbnails"):
        evaluate_index(store, FakeEncoder(), EvalConfig(template_sets=(template_file,), resolution_study=True,
                                                        case_studies=(), text_cache=False))
