"""`cliplens evaluate` and `cliplens probe` end to end: fixture CIFAR-100, the tiny random CLIP, the real open_clip path.

Random weights mean chance-level numbers (1% top-1 for 100 classes); what is checked is that every part of the
report is there, consistent, and says which model produced it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cliplens.cli import main
from cliplens.prompts import load_templates
from cliplens.store import IndexStore, index_files

CASES = {"tractor": ["a tractor", "a tank"], "tulip": ["a tulip", "a flower with cup shape"],
         "seal": ["a seal", "a seal, a marine animal", "a wax seal on a letter"],
         "telephone": ["a smartphone", "a rotary phone", "an old telephone"]}


@pytest.fixture(scope="module")
def evaluated(tiny_index, tmp_path_factory):
    """One `cliplens evaluate` run with every part switched on, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("evaluate")
    argv = ["evaluate", "--index-dir", str(tiny_index), "--out", str(tmp / "report"), "--json", str(tmp / "copy.json"),
            "-k", "1,5,10,100", "--resolution-study", "--limit", "12", "-q", "--device", "cpu"]
    return tmp, argv


def test_evaluate_writes_a_complete_report(evaluated, tiny_index, capsys):
    tmp, argv = evaluated
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "model hf-hub:cliplens-test/tiny-clip" in out and "zero-shot top-1 65.1% CLIP paper" in out
    assert "report: " in out and "report.html" in out
    report = tmp / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics == json.loads((tmp / "copy.json").read_text())
    store = IndexStore.open(tiny_index)
    assert metrics["manifest"] == json.loads((index_files(tiny_index) / "manifest.json").read_text())
    assert metrics["templates"]["cifar100"] == list(load_templates("cifar100")) and len(metrics["templates"]["cifar100"]) == 18
    assert metrics["templates"]["single"] == ["a photo of a {}."]

    rows = metrics["zero_shot"]
    assert {(r["templates"], r["classnames"], r["ensemble"]) for r in rows} == {
        (t, s, o) for t in ("single", "cifar100") for s in ("english", "raw") for o in ("normalize-first", "average-first")}
    for r in rows:  # random weights: near chance (1%); 200 images, so 10% would already be 20 lucky hits
        assert 0 <= r["top1"] <= 0.1 and r["top1"] <= r["top5"] <= 0.25
        assert 0 <= r["within_superclass_error_share"] <= 0.3  # chance: 4 of the 99 other classes, about 4%
    for lab in ("single", "cifar100"):
        p = metrics["per_template"][lab]
        cm = np.array(p["confusion"])
        assert cm.shape == (100, 100) and cm.sum() == 200 and (cm.sum(axis=1) == 2).all()
        sup = np.array(p["superclass_confusion"])
        assert sup.shape == (20, 20) and sup.sum() == 200
        ret = p["retrieval"]
        assert len(ret["per_class"]["ap"]) == 100 and ret["summary"]["classes_evaluated"] == 100
        assert 0 < ret["summary"]["mAP"] < 0.2
        assert set(ret["superclass_fp_share"]) == {"1", "5", "10", "100"}
        assert set(ret["per_class"]) >= {"precision@1", "precision@5", "precision@10", "precision@100", "r_precision"}

    cases = {c["class"]: c for c in metrics["case_studies"]}
    assert set(cases) == set(CASES)
    for name, probes in CASES.items():
        c = cases[name]
        assert c["class_index"] == store.class_names.index(name) and c["num_images"] == 2
        assert [p["query"] for p in c["probes"]] == probes
        assert c["k100"] == 100 and len(c["grid"]["ids"]) == 16
        for variant in ("single", "ensembled"):
            assert 0 <= c[variant]["precision@100"] <= 0.02  # only 2 images of each class exist

    res = metrics["resolution"]
    assert res["count"] == 12 and res["from_size"] == [32, 32] and res["to_size"] == 224
    assert [r["interpolation"] for r in res["rows"]] == ["bicubic", "bilinear", "nearest", "lanczos"]
    # bicubic is the index's own preprocessing: re-encoding reproduces the stored embeddings' top-1
    assert res["rows"][0]["top1"] == res["stored_top1"]

    md = (report / "report.md").read_text()
    sha = store.manifest.model.weights_sha256
    assert f"Model: hf-hub:cliplens-test/tiny-clip, weights sha256 {sha}" in md
    for heading in ("## Zero-shot classification", "## Retrieval with class prompts", "## Case studies",
                    "### seal (2 images)", "## Low resolution", "published: linear probe top-1"):
        assert heading in md
    figures = sorted(p.name for p in (report / "figures").glob("*.png"))
    confusions = [f for f in figures if f.startswith("confusion_")]  # example images of the top confusion pairs
    assert 1 <= len(confusions) <= 10 and "## Embedding map" in md
    assert sorted(set(figures) - set(confusions)) == sorted(["template_comparison.png", "superclass_confusion.png",
                                                             "per_class_ap.png", "map_pca.png",
                                                             *(f"case_{c}.png" for c in CASES)])
    html = (report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 8 + len(confusions) and "http" not in html


def test_text_cache_is_used_on_the_real_path(evaluated, tiny_index, capsys, monkeypatch):
    from cliplens.encoder import Encoder

    tmp, _ = evaluated
    argv = ["evaluate", "--index-dir", str(tiny_index), "--out", str(tmp / "again"), "--templates", "single",
            "--classnames", "english", "-q"]
    main(argv)  # fills the cache, unless the full run above already did
    calls = []
    original = Encoder.encode_texts_raw
    monkeypatch.setattr(Encoder, "encode_texts_raw", lambda self, t, *a, **k: calls.append(len(t)) or original(self, t, *a, **k))
    assert main(argv) == 0
    assert calls == []  # every class prompt came from $CLIPLENS_HOME/textcache
    assert main(argv + ["--no-text-cache"]) == 0
    # 100 classes x (1 single template + the 18 cifar100 ones behind the case studies' ensembled prompts)
    assert sum(calls) == 100 * (1 + 18)
    capsys.readouterr()


def test_probe_cli(train_index, tiny_index, tmp_path, capsys):
    argv = ["probe", "--index-dir", str(train_index), "--eval-index-dir", str(tiny_index), "--limit-per-class", "4",
            "--cs", "1,100", "--json", str(tmp_path / "probe.json"), "-q", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train embeddings: 500 images embedded in" in out
    assert "C sweep on 100 validation images carved from train" in out
    for line in ("linear probe", "zero-shot (cifar100)", "probe gains most", "probe gains least",
                 "linear probe about 80% (CLIP_benchmark)"):
        assert line in out
    m = json.loads((tmp_path / "probe.json").read_text())
    p = m["probe"]
    assert p["num_train"] == 300 and p["num_val"] == 100 and p["num_test"] == 200 and p["limit_per_class"] == 4
    assert p["best_C"] in {s["C"] for s in p["sweep"]} and len(p["sweep"]) == 4  # 1, 100 and the refinement
    assert 0 <= p["top1"] <= p["top5"] <= 1 and len(p["per_class_accuracy"]) == 100
    assert m["train_embedding"]["seconds"] > 0 and m["model"]["name"] == "hf-hub:cliplens-test/tiny-clip"
    assert 0 <= m["zero_shot"]["top1"] <= 0.1 and len(m["gains"]["most"]) == 5


def test_probe_refuses_indexes_of_different_models(train_index, tiny_index, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_index, other)
    manifest = json.loads((index_files(other) / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    (index_files(other) / "manifest.json").write_text(json.dumps(manifest))
    assert main(["probe", "--index-dir", str(train_index), "--eval-index-dir", str(other), "--no-zero-shot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplens: error: the train index was built with") and "same --model" in err
    assert len(err.splitlines()) == 1


def test_evaluate_errors_are_one_line(tiny_index, tmp_path, capsys):
    assert main(["evaluate", "--index-dir", str(tiny_index), "--templates", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "template set or file not found" in err and len(err.splitlines()) == 1
    assert main(["evaluate", "--index-dir", str(tmp_path / "none")]) == 2
    assert "no index at" in capsys.readouterr().err


def test_search_takes_a_template_set(tiny_index, capsys):
    assert main(["search", "tulip", "--index-dir", str(tiny_index), "--templates", "cifar100", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and result["query_class"] == "tulip"
