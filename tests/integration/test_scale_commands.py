"""Backends on the commands that rank (``evaluate``, ``serve``) and HNSW's build setting (``--ef-construction``).

The exact numpy index is the oracle everywhere: FAISS Flat must give the same evaluation numbers and the same API
hits as exact; HNSW on the tiny index must come close; a build setting must reach the saved FAISS index.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from cliplens.cli import build_parser, main  # noqa: E402
from cliplens.errors import BackendError  # noqa: E402
from cliplens.evaluate import EvalConfig, evaluate_index  # noqa: E402
from cliplens.index import ExactIndex, build_index, open_index  # noqa: E402
from cliplens.store import IndexStore, IndexWriter  # noqa: E402

N_QUERIES = 40


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_index):
    """A copy of the fixture index (200 CIFAR-format images, tiny model) with FAISS Flat and HNSW32 built beside it."""
    root = tmp_path_factory.mktemp("scale") / "cifar100-test"
    shutil.copytree(tiny_index, root)
    store = IndexStore.open(root)
    build_index(store, "faiss", factory="Flat", progress=False)
    build_index(store, "faiss", factory="HNSW32", progress=False)
    return root


class Spy:
    """A backend wrapper that records each search's (number of queries, k)."""

    def __init__(self, index):
        self.index, self.calls = index, []

    def search(self, queries, k, *, allowed=None):
        self.calls.append((len(np.atleast_2d(queries)), k))
        return self.index.search(queries, k, allowed=allowed)


def _retrieval(report) -> dict:
    return {lab: p["retrieval"] for lab, p in report.per_template.items()}


def _case_numbers(report) -> list:
    return [(c["class"], c["single"], c["ensembled"], [(p["query"], p["precision@100"]) for p in c["probes"]],
             c["grid"]["ids"].tolist()) for c in report.case_studies]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_through_faiss_flat_equals_exact_and_hnsw_is_close(index_dir, tiny_encoder, tmp_path):
    store = IndexStore.open(index_dir)
    config = EvalConfig(text_cache_dir=tmp_path / "textcache")
    exact = evaluate_index(store, tiny_encoder, config)
    flat = Spy(open_index(store, "faiss", factory="Flat"))
    through_flat = evaluate_index(store, tiny_encoder, config, index=flat, index_label="faiss Flat")

    n = len(store)
    class_queries = [c for c in flat.calls if c[0] > 1]
    assert class_queries == [(100, n)] * len(exact.per_template)  # every class prompt, the whole ranking, per set
    assert len(flat.calls) - len(class_queries) >= 2 * 4  # the case studies' single and ensembled queries, at least
    for lab, want in _retrieval(exact).items():
        got = _retrieval(through_flat)[lab]
        assert got["summary"] == want["summary"]
        for key, values in want["per_class"].items():
            np.testing.assert_array_equal(got["per_class"][key], values, err_msg=f"{lab} {key}")
        assert got["superclass_fp_share"] == want["superclass_fp_share"]
    assert _case_numbers(through_flat) == _case_numbers(exact)
    assert [z["top1"] for z in through_flat.zero_shot] == [z["top1"] for z in exact.zero_shot]
    assert through_flat.retrieval_index == {"backend": "faiss Flat", "depth": n}
    assert exact.retrieval_index == {"backend": "exact", "depth": None}
    assert any("ranked by faiss Flat: top 200 of 200" in note for note in through_flat.notes)

    hnsw = open_index(store, "faiss", factory="HNSW32", ef_search=16)
    through_hnsw = evaluate_index(store, tiny_encoder, config, index=hnsw)
    for lab, want in _retrieval(exact).items():
        got = _retrieval(through_hnsw)[lab]["summary"]
        assert got["mAP"] == pytest.approx(want["summary"]["mAP"], abs=0.005)
        for k in (1, 5, 10, 100):
            assert got[f"mean_precision@{k}"] == pytest.approx(want["summary"][f"mean_precision@{k}"], abs=0.005)


def test_evaluate_retrieval_depth_limits_what_counts_as_retrieved(index_dir, tiny_encoder, tmp_path):
    store = IndexStore.open(index_dir)
    exact = evaluate_index(store, tiny_encoder, EvalConfig(text_cache_dir=tmp_path / "tc", case_studies=()))
    config = EvalConfig(text_cache_dir=tmp_path / "tc", case_studies=(), retrieval_depth=5)
    flat = Spy(open_index(store, "faiss", factory="Flat"))
    shallow = evaluate_index(store, tiny_encoder, config, index=flat)
    assert {k for _, k in flat.calls} == {5}
    for lab, want in _retrieval(exact).items():
        got = _retrieval(shallow)[lab]["per_class"]
        for k in (1, 5):  # inside the depth: the same
            np.testing.assert_array_equal(got[f"precision@{k}"], want["per_class"][f"precision@{k}"])
        np.testing.assert_array_equal(got["num_relevant"], want["per_class"]["num_relevant"])
        # AP from the top 5 only: each class's relevant images outside them all sit in one unretrieved tail
        found = got["precision@5"] * 5  # relevant images among the 5 retrieved
        tail = got["num_relevant"] - found
        assert np.all(got["ap"] <= (found + tail * got["num_relevant"] / len(store)) / got["num_relevant"] + 1e-12)
    assert any("images beyond that count as not retrieved" in note for note in shallow.notes)


def test_cli_evaluate_with_backend(index_dir, tmp_path, capsys):
    common = ["evaluate", "--index-dir", str(index_dir), "--templates", "single", "-k", "1,5,10", "-q",
              "--device", "cpu", "--text-cache-dir", str(tmp_path / "tc")]
    metrics = {}
    for name, flags in (("exact", []), ("flat", ["--backend", "faiss", "--faiss-index", "Flat"])):
        assert main([*common, "--out", str(tmp_path / name), *flags]) == 0
        out = capsys.readouterr().out
        assert ("ranked by faiss Flat, top 200" in out) == (name == "flat")
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert metrics["flat"]["per_template"] == metrics["exact"]["per_template"]
    assert metrics["flat"]["retrieval_index"] == {"backend": "faiss Flat", "depth": 200}
    assert metrics["flat"]["case_studies"] == metrics["exact"]["case_studies"]
    for page in ("report.md", "report.html"):  # the report says which backend ranked
        assert "ranked by faiss Flat: top 200 of 200" in (tmp_path / "flat" / page).read_text()
        assert "ranked by" not in (tmp_path / "exact" / page).read_text()

    for flags, message in ((["--backend", "annoy"], "unknown index backend 'annoy': use one of exact, faiss, milvus"),
                           (["--backend", "faiss", "--faiss-index", "IVF2,Flat"], "no FAISS IVF2,Flat index"),
                           (["--backend", "faiss", "--retrieval-depth", "0"], "expected a whole number >= 1")):
        assert main([*common, "--out", str(tmp_path / "bad"), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # refused before any report was written


# --------------------------------------------------------------------------- serve


def _serve_args(index_dir, *flags):
    return build_parser().parse_args(["serve", "--index-dir", str(index_dir), "--device", "cpu", *flags])


def _api_hits(searchers, queries) -> list:
    from cliplens.web import create_app

    with TestClient(create_app(searchers), base_url="http://127.0.0.1") as client:
        out = []
        for q in queries:
            r = client.get("/api/search", params={"q": q, "k": 10})
            assert r.status_code == 200, r.text
            out.append([(h["rank"], h["id"], h["label"], round(h["score"], 5)) for h in r.json()["hits"]])
        r = client.post("/api/search", json={"q": "tulip", "k": 5, "where": ["superclass=flowers"]})
        assert r.status_code == 200, r.text
        out.append([(h["id"], h["superclass"]) for h in r.json()["hits"]])
        return out


@pytest.mark.parametrize("flags", [["--backend", "faiss", "--faiss-index", "Flat"], ["--backend", "milvus"]],
                         ids=["faiss-flat", "milvus-lite"])
def test_serve_with_backend_returns_the_exact_hits(index_dir, flags, tmp_path):
    from cliplens.cli.web import build_searchers

    if flags[1] == "milvus":
        pytest.importorskip("milvus_lite")
        root = tmp_path / "cifar100-test"  # a private copy: Milvus Lite keeps its database file in the folder
        shutil.copytree(index_dir, root, ignore=shutil.ignore_patterns("faiss"))
        assert main(["build-index", "--index-dir", str(root), "--backend", "milvus", "-q"]) == 0
    else:
        root = index_dir
    queries = ("apple", "tractor", "a cloudy sky")
    exact = build_searchers(_serve_args(root))
    chosen = build_searchers(_serve_args(root, *flags))
    name = next(iter(chosen))
    assert type(chosen[name].index).__name__ == {"faiss": "FaissIndex", "milvus": "MilvusIndex"}[flags[1]]
    assert type(exact[name].index) is ExactIndex
    hits = _api_hits(chosen, queries)
    assert hits == _api_hits(exact, queries)
    assert all(len(h) == 10 for h in hits[:-1]) and all(s == "flowers" for _, s in hits[-1])
    if hasattr(chosen[name].index, "close"):
        chosen[name].index.close()


def test_cli_serve_refuses_a_bad_backend_before_listening(index_dir, capsys):
    for flags, message in ((["--backend", "annoy"], "unknown index backend 'annoy'"),
                           (["--backend", "faiss", "--faiss-index", "HNSW64"], "no FAISS HNSW64 index"),
                           (["--index-dir", str(index_dir), "--backend", "milvus", "--milvus-collection", "x"],
                            "--milvus-collection names one collection")):
        assert main(["serve", "--index-dir", str(index_dir), "--port", "0", *flags]) == 2
        out, err = capsys.readouterr()
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "serving" not in out


# --------------------------------------------------------------------------- --ef-construction


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """3000 seeded unit vectors in 30 clusters (dim 64) and 40 queries near the centres."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((30, 64)))
    vectors = _unit(centres[rng.integers(0, 30, 3000)] + 0.18 * rng.standard_normal((3000, 64)))
    queries = _unit(centres[rng.integers(0, 30, N_QUERIES)] + 0.18 * rng.standard_normal((N_QUERIES, 64)))
    root = tmp_path_factory.mktemp("clustered") / "idx"
    writer = IndexWriter(root=root, identity={"model": "m", "source": "clustered", "count": 3000,
                                              "dtype": "float32"}, dim=64)
    writer.start()
    writer.write(0, vectors)
    writer.checkpoint(3000)
    writer.finalize(items={"id": np.arange(3000), "ref": [f"v{i}" for i in range(3000)]},
                    manifest={"model": {"name": "m"}})
    return IndexStore.open(root), queries


def _recall(ids, truth) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)]))


def _graph(index):
    return faiss.vector_to_array(faiss.downcast_index(index.index).hnsw.neighbors)


def test_ef_construction_is_applied_saved_and_keeps_recall(clustered):
    store, queries = clustered
    truth = ExactIndex(store.embeddings).search(queries, 10)[1]
    built = build_index(store, "faiss", factory="HNSW16", name="hnsw_efc200", ef_construction=200, progress=False)
    reopened = open_index(store, "faiss", factory="HNSW16", name="hnsw_efc200", ef_search=32)
    assert faiss.downcast_index(reopened.index).hnsw.efConstruction == 200  # read back from the saved index
    assert json.loads(reopened.paths[1].read_text())["ef_construction"] == 200
    default = build_index(store, "faiss", factory="HNSW16", name="hnsw_default", progress=False)
    assert json.loads(default.paths[1].read_text())["ef_construction"] == 40  # FAISS's default, recorded
    assert not np.array_equal(_graph(built), _graph(default))  # set before the vectors went in: another graph
    scores, ids = reopened.search(queries, 10)
    assert _recall(ids, truth) >= 0.95
    exact_scores = np.take_along_axis(ExactIndex(store.embeddings).scores(queries), ids, axis=1)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)
    assert _recall(reopened.search(queries, 10)[1], truth) >= _recall(default.search(queries, 10, ef_search=32)[1],
                                                                        truth) - 0.02


def test_ef_construction_refused_where_it_means_nothing(clustered):
    store, _ = clustered
    for factory in ("Flat", "IVF8,Flat"):
        with pytest.raises(BackendError, match=f"efConstruction applies to HNSW indexes, not '{factory}'") as info:
            build_index(store, "faiss", factory=factory, ef_construction=100, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(BackendError, match="whole number >= 1"):
        build_index(store, "faiss", factory="HNSW16", ef_construction=0, progress=False)


def test_cli_ef_construction(index_dir, cifar_root, tiny_model, tmp_path, capsys):
    root = tmp_path / "idx"
    shutil.copytree(index_dir, root)
    assert main(["build-index", "--index-dir", str(root), "--backend", "faiss", "--faiss-index", "HNSW32",
                 "--ef-construction", "80", "-q"]) == 0
    assert "built FAISS HNSW32 (efConstruction 80)" in capsys.readouterr().out
    assert json.loads((root / "faiss" / "hnsw32.json").read_text())["ef_construction"] == 80
    loaded = open_index(IndexStore.open(root), "faiss", factory="HNSW32")
    assert faiss.downcast_index(loaded.index).hnsw.efConstruction == 80

    bad = ((["build-index", "--index-dir", str(root), "--backend", "faiss", "--faiss-index", "Flat",
              "--ef-construction", "80"], "--ef-construction applies to HNSW indexes, not 'Flat'"),
           (["build-index", "--index-dir", str(root), "--backend", "milvus", "--ef-construction", "80"],
            "not the milvus backend"),
           (["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(tmp_path / "new"),
             "--model", tiny_model, "--device", "cpu", "-q", "--ef-construction", "80"], "not the exact backend"),
           (["build-index", "--index-dir", str(root), "--backend", "faiss", "--ef-construction", "0"],
            "must be at least 1"))
    for argv, message in bad:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "new").exists()  # refused before embedding anything

    out = tmp_path / "embedded"
    assert main(["index", "cifar100", "--data-dir", str(cifar_root), "--no-verify", "--index-dir", str(out),
                 "--model", tiny_model, "--device", "cpu", "--batch-size", "32", "-q", "--backend", "faiss",
                 "--faiss-index", "HNSW32", "--ef-construction", "64"]) == 0
    assert "built FAISS HNSW32 (efConstruction 64)" in capsys.readouterr().out
    assert json.loads((out / "faiss" / "hnsw32.json").read_text())["ef_construction"] == 64
    assert main(["search", "apple", "--index-dir", str(out), "--backend", "faiss", "-k", "5", "--json"]) == 0
    got = [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert main(["search", "apple", "--index-dir", str(out), "-k", "5", "--json"]) == 0
    assert got == [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]]
