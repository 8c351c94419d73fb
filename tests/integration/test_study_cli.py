"""fewshot, suspects, map, compare, calibrate end to end: fixture CIFAR-100, the tiny random CLIP, and a photo folder.

Random weights give chance-level numbers; what is checked is that each command runs on both kinds of index, writes
a complete report, keeps its promises (probe at shots=all == `cliplens probe`; the calibrated cut is applied) and
refuses what it cannot do in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import folder_fixture
from cliplens.cli import main
from cliplens.store import IndexStore


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("photos")
    photos = folder_fixture.make_folder(root / "photos")
    out = root / "index"
    assert main(["index", str(photos), "--index-dir", str(out), "--model", tiny_model, "-q", "--device", "cpu"]) == 0
    return out


def test_fewshot_writes_a_report_and_its_all_shots_probe_is_cliplens_probe(train_index, tiny_index, tmp_path, capsys):
    out = tmp_path / "few"
    argv = ["fewshot", "--train-index-dir", str(train_index), "--index-dir", str(tiny_index), "--shots", "1,2,all",
            "--seeds", "2", "--cs", "1", "--val-fraction", "0.2", "--out", str(out), "-q", "--device", "cpu"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "published (not measured here): zero-shot CLIP matches about a 4-shot" in text and "tip-adapter-f" in text
    m = json.loads((out / "metrics.json").read_text())
    cells = {(r["method"], r["shots"]): r for r in m["rows"]}
    assert {k for k in cells if k[1] == "2"} == {(x, "2") for x in ("probe", "tip-adapter", "tip-adapter-f", "zs-probe")}
    assert cells["probe", "2"]["seeds"] == 2 and all(r["num_shots"] == 200 for r in cells["probe", "2"]["runs"])
    assert (out / "report.html").is_file() and (out / "figures" / "fewshot.png").is_file()
    assert main(["probe", "--index-dir", str(train_index), "--eval-index-dir", str(tiny_index), "--cs", "1",
                 "--no-zero-shot", "--json", str(tmp_path / "probe.json"), "-q"]) == 0
    probe = json.loads((tmp_path / "probe.json").read_text())["probe"]
    assert cells["probe", "all"]["mean"] == probe["top1"] and cells["probe", "all"]["runs"][0]["params"]["C"] == probe["best_C"]
    capsys.readouterr()
    assert main(argv[:-5] + ["--methods", "zero-shot", "probe", "--json", "-q", "--device", "cpu"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["methods"] == ["zero-shot", "probe"] and j["num_test"] == 200


def test_suspects_with_train_neighbours_reference_and_duplicates(train_index, tiny_index, tmp_path, capsys):
    ref = tmp_path / "bad.txt"
    ref.write_text("# known bad\n3\n17\n")
    assert main(["suspects", "--index-dir", str(tiny_index), "--train-index-dir", str(train_index), "--top", "5",
                 "--reference", str(ref), "--out", str(tmp_path / "sus"), "--json", "-q", "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["neighbours_from"] == "train index" and m["flagged"] == len(m["suspects"])
    conf = [s["self_confidence"] for s in m["suspects"]]
    assert conf == sorted(conf)
    assert set(m["reference"]["precision"]) == {"5", "10", "50", "100"} and m["reference"]["count"] == 2
    d = m["duplicates"]
    assert d["threshold_from"].startswith("1st percentile") and d["measurement"]["sample"] == 200
    assert all(p["cosine"] >= d["threshold"] for p in d["pairs"])
    html = (tmp_path / "sus" / "report.html").read_text()
    assert "published: about 6% of the CIFAR-100 test set is mislabelled" in html


def test_map_caches_its_projection_and_colours_folders(tiny_index, folder_index, tmp_path, capsys):
    tiny_index = Path(shutil.copytree(tiny_index, tmp_path / "own-index"))  # other tests' evaluate caches a map too
    for old in tiny_index.glob("projection-*"):
        old.unlink()
    png = tmp_path / "m.png"
    assert main(["map", "--index-dir", str(tiny_index), "--out", str(png), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["from_cache"] is False and first["coloured_by"] == "superclass" and first["groups"] == 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = list(tiny_index.glob("projection-pca-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (200, 2)
    assert main(["map", "--index-dir", str(tiny_index), "--out", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["from_cache"] is True
    assert main(["map", "--index-dir", str(folder_index), "--out", str(tmp_path / "f.png"), "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    assert f["coloured_by"] == "folder" and f["groups"] == 4  # top folder, skipme, sub, sub/deep
    assert main(["map", "--index-dir", str(tiny_index), "--out", str(tmp_path / "m.jpg")]) == 2


def test_calibrate_then_search_min_score_calibrated(tiny_index, tmp_path, capsys):
    from cliplens.calibrate import lookup, record

    # random weights: only the lowest cut reaches 1% precision (chance for 100 classes)
    assert main(["calibrate", "--index-dir", str(tiny_index), "--target", "0.01", "--out", str(tmp_path / "cal"),
                 "--json", "-q", "--device", "cpu"]) == 0
    cal = json.loads(capsys.readouterr().out)
    assert cal["threshold"] is not None and cal["precision"] >= 0.01 and cal["recall"] == 1.0
    model = IndexStore.open(tiny_index).manifest.model
    assert lookup(model, "a photo of a {}.")["threshold"] == cal["threshold"]
    assert (tmp_path / "cal" / "figures" / "calibration.png").is_file()
    assert main(["search", "tractor", "--index-dir", str(tiny_index), "-k", "200", "--json", "--device", "cpu"]) == 0
    every = json.loads(capsys.readouterr().out)["hits"]
    cut = float(np.median([h["score"] for h in every]))  # a cut that matters: recorded as if calibrated
    record(model, "a photo of a {}.", {"threshold": cut}, index=str(tiny_index))
    assert main(["search", "tractor", "--index-dir", str(tiny_index), "-k", "200", "--min-score", "calibrated",
                 "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [h["id"] for h in hits] == [h["id"] for h in every if h["score"] >= cut] and 90 <= len(hits) <= 110
    assert main(["search", "tractor", "--index-dir", str(tiny_index), "--template", "a sketch of a {}.",
                 "--min-score", "calibrated", "--device", "cpu"]) == 2
    assert "run `cliplens calibrate" in capsys.readouterr().err


def test_compare_two_indexes_and_refuse_different_sources(tiny_index, train_index, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_index, twin)
    for p in twin.glob("projection-*"):
        p.unlink()
    assert main(["compare", "--index-dir", str(tiny_index), "--index-dir", str(twin), "--train-index-dir",
                 str(train_index), "--train-index-dir", str(train_index), "--shots", "1,2", "--seeds", "1",
                 "--query", "tractor", "--out", str(tmp_path / "cmp"), "--json", "-q", "--device", "cpu"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert len(m["models"]) == 2 and m["models"][0]["top1"] == m["models"][1]["top1"]  # same model, same images
    assert set(m["models"][0]["crossover"]) == {"probe", "tip-adapter"}
    assert m["queries"][0]["query"] == "tractor" and [len(h) for h in m["queries"][0]["hits"]] == [10, 10]
    assert "Query 'tractor'" in (tmp_path / "cmp" / "report.md").read_text()
    assert main(["compare", "--index-dir", str(tiny_index), "--index-dir", str(train_index), "-q"]) == 2
    assert "do not hold the same labelled images" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["fewshot", "--train-index-dir", "{f}", "--index-dir", "{f}"],
                                  ["suspects", "--index-dir", "{f}"], ["calibrate", "--index-dir", "{f}"]])
def test_label_studies_refuse_a_folder_in_one_line(folder_index, argv, capsys):
    assert main([a.replace("{f}", str(folder_index)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no labels" in err and "cliplens map" in err
    assert IndexStore.open(folder_index).has_labels is False
