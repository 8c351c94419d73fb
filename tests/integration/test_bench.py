"""The benchmark harness runs end to end at tiny sizes and writes its JSON and Markdown (timings not checked).

In-process: each benchmark's ``run`` with the tiny stand-in model of conftest (seconds). As a subprocess
(slow): ``python -m bench all`` and ``cliplens bench``, which write their own stand-in hub cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HEADER_KEYS = ("cpu", "cores", "torch", "date", "load_average_start", "load_average_end")


@pytest.fixture(scope="module")
def bench_pkg():
    sys.path.insert(0, str(REPO))
    try:
        import bench.agreement
        import bench.indexing
        import bench.search
        import bench.text  # noqa: F401

        yield bench
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def reference(tiny_model):
    import open_clip

    model, _, transform = open_clip.create_model_and_transforms(tiny_model)
    model.eval()
    return model, transform, open_clip.get_tokenizer(tiny_model)


def _check_written(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    for key in HEADER_KEYS:
        assert key in data["machine"], key
    assert data["machine"]["cores"] == os.cpu_count()
    assert f"{data['machine']['cores']} cores" in md and f"torch {data['machine']['torch']}" in md
    assert "load average at start" in md and "|---|" in md
    return data


def test_indexing_and_agreement_run_and_write_results(bench_pkg, reference, tiny_encoder, tiny_model, tmp_path):
    from cliplens.encoder import load_encoder

    encoders = {"exact": tiny_encoder, "fast": load_encoder(tiny_model, device="cpu", precision="fast")}
    report = bench_pkg.indexing.run(reference=reference, encoders=encoders, workdir=tmp_path / "w", n=24, reps=2,
                                    jpegs=2, batch_size=None, command="test")
    report.write(tmp_path / "out")
    data = _check_written(tmp_path / "out", "indexing")["data"]
    for suite in ("cifar", "jpeg"):
        assert set(data[suite]) == {"reference", "exact", "fast"}
        assert len(data[suite]["exact"]["seconds"]) == 2
        assert data[suite]["exact"]["cosine_to_reference"]["min"] >= 0.99999  # same answers as open_clip
        assert data[suite]["fast"]["cosine_to_reference"]["mean"] >= 0.999
        assert data[suite]["reference"]["ratio_to_reference"] == 1.0
    report = bench_pkg.agreement.run(reference=reference, encoders=encoders, n=32, command="test")
    report.write(tmp_path / "out")
    data = _check_written(tmp_path / "out", "agreement")["data"]
    assert data["images"]["exact"]["cosine_min"] >= 0.99999
    assert data["images"]["exact"]["top10_overlap_vs_exact_mean"] == 1.0
    assert data["images"]["fast"]["cosine_mean"] >= 0.999
    assert data["text"]["max_abs_diff"] < 1e-5 and data["text"]["prompts"] == 24 + 18


def test_text_and_search_run_and_write_results(bench_pkg, reference, tiny_encoder, tiny_model, tmp_path):
    from cliplens.encoder import load_encoder

    encoders = {"exact": tiny_encoder, "fast": load_encoder(tiny_model, device="cpu", precision="fast")}
    report = bench_pkg.text.run(reference=reference, encoders=encoders, workdir=tmp_path / "w", n=500, reps=1,
                                command="test")
    report.write(tmp_path / "out")
    data = _check_written(tmp_path / "out", "text")["data"]
    assert len(data["latency"]) == 2 + 2 * 4 and all(v["p50_ms"] > 0 for v in data["latency"].values())
    assert data["top10_overlap_with_reference_tractor"] == {"exact": 1.0, "fast": 1.0}  # open_clip's ranking
    report = bench_pkg.search.run(sizes=[300, 2000], reps=3, command="test")
    report.write(tmp_path / "out")
    data = _check_written(tmp_path / "out", "search")["data"]["search"]
    assert set(data) == {"300/float32", "300/float16", "2000/float32", "2000/float16"}
    assert all(v["same_ids_as_reference"] for v in data.values())
    assert all(v["peak_rss_mb"] > 0 for v in data.values())


def test_benchmark_inputs_are_what_they_claim(bench_pkg, tmp_path):
    from PIL import Image

    from bench.data import QUERIES, read_cifar_rows, unit_vectors, write_cifar100, write_jpegs
    from cliplens.sources import load_cifar

    assert len(QUERIES) == 24 and QUERIES[:4] == ("tractor", "tulip", "seal", "telephone")
    folder = write_cifar100(tmp_path, 10)
    data = load_cifar("cifar100", "test", data_dir=tmp_path, verify=False, download=False, progress=False)
    np.testing.assert_array_equal(data.images, read_cifar_rows(folder))  # the real CIFAR layout both ways
    for path in write_jpegs(tmp_path / "jpg", 4):
        with Image.open(path) as im:
            assert im.format == "JPEG" and 1.0e6 <= im.width * im.height <= 4.0e6
    v = unit_vectors(1000, 16, dtype=np.float16, chunk=300)
    assert v.dtype == np.float16 and np.allclose(np.linalg.norm(v.astype(np.float32), axis=1), 1, atol=1e-2)


def test_cliplens_bench_outside_a_checkout_says_so(monkeypatch, capsys):
    from cliplens.cli import bench as cli_bench
    from cliplens.cli import main

    assert cli_bench.find_checkout() == REPO
    monkeypatch.setattr(cli_bench, "find_checkout", lambda: None)
    assert main(["bench", "search"]) == 2
    err = capsys.readouterr().err
    assert "needs a source checkout" in err and err.count("\n") == 1


@pytest.mark.slow
def test_python_m_bench_all_and_cliplens_bench(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CLIPLENS_"))}
    args = ["all", "--model", "tiny", "--n", "16", "--reps", "1", "--jpegs", "2", "--index-size", "300",
            "--sizes", "200", "--out", str(out)]
    run = subprocess.run([sys.executable, "-W", "error", "-m", "bench", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("indexing", "text", "search", "agreement", "batch"):
        _check_written(out, name)
        assert (out / f"{name}.md").read_text().startswith("## ")
    latest = (out / "latest.md").read_text()
    assert latest.count("Machine: ") == 5 and "python -m bench all --model tiny" in latest
    assert "| exact | exact |" in latest and "fast:" in latest
    # The CLI forwards to the same harness (a fresh interpreter, so the stand-in cache is its own).
    cli = subprocess.run([sys.executable, "-m", "cliplens", "bench", "search", "--sizes", "100", "--reps", "1",
                          "--out", str(tmp_path / "cli")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "cli" / "search.json").is_file()
