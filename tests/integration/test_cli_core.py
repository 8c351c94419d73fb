"""End to end through the CLI: index, search, info, demo, and every bad input of the core issue."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cifar_fixture
from cliplens.cli import main
from cliplens.store import IndexStore, index_files


def _tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its sha256: 'nothing on disk changed' means this is equal before and after."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cliplens: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails at once, as it does on a machine without internet."""
    import cliplens.sources.cifar as dl

    def refuse(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(dl, "_urlopen", refuse)


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, cifar_root, tiny_model):
    out = tmp_path_factory.mktemp("cli") / "idx"
    code = main(["index", "cifar100", "--split", "test", "--data-dir", str(cifar_root), "--no-verify",
                 "--index-dir", str(out), "--model", tiny_model, "--batch-size", "16", "-q"])
    assert code == 0
    return out


def test_index_then_search_json_equals_brute_force(cli_index, tiny_encoder, cifar_test, capsys):
    store = IndexStore.open(cli_index)
    assert len(store) == len(cifar_test) == 200
    np.testing.assert_array_equal(store.images(), cifar_test.images)
    # Reference: the embeddings computed directly by the encoder, and a brute-force ranking.
    emb = tiny_encoder.encode_images(cifar_test.images)
    np.testing.assert_allclose(store.embeddings, emb, atol=1e-6, rtol=0)
    code, out, _ = run_cli(capsys, "search", "sweet pepper", "--index-dir", cli_index, "-k", 7, "--json")
    assert code == 0
    got = json.loads(out)
    q = tiny_encoder.encode_texts(["a photo of a sweet pepper."])[0]
    s = emb @ q
    ref = sorted(range(len(s)), key=lambda i: (-s[i], i))[:7]
    assert [h["id"] for h in got["hits"]] == ref
    assert [h["rank"] for h in got["hits"]] == list(range(1, 8))
    np.testing.assert_allclose([h["score"] for h in got["hits"]], s[ref], atol=1e-5)
    assert got["query"] == "sweet pepper" and got["prompt"] == "a photo of a sweet pepper." and got["k"] == 7
    pepper = cifar_test.class_names.index("sweet_pepper")
    assert got["precision_at_k"] == pytest.approx(np.mean(cifar_test.labels[ref] == pepper))
    names = [n.replace("_", " ") for n in cifar_test.class_names]
    assert [h["label"] for h in got["hits"]] == [names[cifar_test.labels[i]] for i in ref]
    assert {"rank", "id", "score", "label", "superclass"} <= set(got["hits"][0])


def test_search_table_grid_and_info(cli_index, capsys, tmp_path):
    grid = tmp_path / "g.png"
    code, out, _ = run_cli(capsys, "search", "lawn mower", "--index-dir", cli_index, "-k", 5, "--grid", grid)
    assert code == 0
    assert 'prompt "a photo of a lawn mower."' in out and 'precision@5 for class "lawn mower"' in out
    assert out.count("✓") + out.count("✗") == 5
    with Image.open(grid) as im:
        assert im.width > 5 * 128 and im.height > 128
        px = np.asarray(im.convert("RGB"))
    green, red = np.all(px == (34, 160, 60), axis=-1).sum(), np.all(px == (210, 40, 40), axis=-1).sum()
    assert green + red > 5 * 4 * 128  # every tile has a coloured border
    code, out, _ = run_cli(capsys, "search", "a cat on a sofa", "--index-dir", cli_index, "-k", 3, "--raw")
    assert code == 0 and 'prompt "a cat on a sofa"' in out and "precision" not in out
    code, out, _ = run_cli(capsys, "info", "--index-dir", cli_index)
    assert code == 0 and "200 x 32 float32" in out and "not verified" in out and "100 classes, 20 superclasses" in out
    code, out, _ = run_cli(capsys, "info", "--index-dir", cli_index, "--json")
    m = json.loads(out)
    assert m["model"]["name"].startswith("hf-hub:") and m["source"]["fingerprint"]["verified"] is False


def test_reindex_same_settings_is_a_no_op(cli_index, cifar_root, tiny_model, capsys):
    before = _tree_digest(cli_index)
    code, out, _ = run_cli(capsys, "index", "cifar100", "--data-dir", cifar_root, "--no-verify", "--index-dir",
                           cli_index, "--model", tiny_model, "--batch-size", 16, "-q")
    assert code == 0 and "already complete" in out
    assert _tree_digest(cli_index) == before


def test_demo_runs_the_four_case_studies(cifar_root, tiny_model, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "demo", "--data-dir", cifar_root, "--no-verify", "--index-dir", tmp_path / "i",
                           "--out", tmp_path / "grids", "--model", tiny_model, "-q")
    assert code == 0
    for name in ("tractor", "tulip", "seal", "telephone"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        p = float(line.split()[1])
        assert 0.0 <= p <= 1.0
        assert (tmp_path / "grids" / f"{name}.png").is_file()


# --------------------------------------------------------------------------- bad input


def test_missing_data_and_no_network(tmp_path, tiny_model, no_network, capsys):
    code, _, err = run_cli(capsys, "index", "cifar100", "--data-dir", tmp_path / "nothing", "--index-dir",
                           tmp_path / "i", "--model", tiny_model, "-q")
    assert_one_line_error(code, err, "download")
    assert not (tmp_path / "i").exists()


def test_checksum_mismatch_names_no_verify(cifar_root, tmp_path, tiny_model, capsys):
    before = _tree_digest(cifar_root)
    code, _, err = run_cli(capsys, "index", "cifar100", "--data-dir", cifar_root, "--index-dir", tmp_path / "i",
                           "--model", tiny_model, "-q")
    assert_one_line_error(code, err, "--no-verify")
    assert _tree_digest(cifar_root) == before


def test_verified_official_files_are_recorded(tmp_path, tiny_model, monkeypatch, capsys):
    fx = cifar_fixture.make_cifar100(tmp_path / "d", per_class_test=1, per_class_train=1, archive=True)
    cifar_fixture.official_md5_patch(monkeypatch, fx)
    code, _, _ = run_cli(capsys, "index", "cifar100", "--data-dir", tmp_path / "d", "--index-dir", tmp_path / "i",
                         "--model", tiny_model, "-q")
    assert code == 0
    assert IndexStore.open(tmp_path / "i").manifest.source.fingerprint["verified"] is True


def test_truncated_archive(tmp_path, tiny_model, capsys):
    fx = cifar_fixture.make_cifar100(tmp_path / "d", per_class_test=1, per_class_train=1, archive=True)
    cifar_fixture.truncate(fx.archive)
    before = _tree_digest(tmp_path / "d")
    code, _, err = run_cli(capsys, "index", "cifar100", "--data-dir", tmp_path / "d", "--no-verify",
                           "--index-dir", tmp_path / "i", "--model", tiny_model, "-q")
    assert_one_line_error(code, err, "cifar-100-python.tar.gz")
    assert _tree_digest(tmp_path / "d") == before


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_model, capsys):
    marker = tmp_path / "pwned"
    cifar_fixture.make_malicious_cifar100(tmp_path / "d", marker)
    code, _, err = run_cli(capsys, "index", "cifar100", "--data-dir", tmp_path / "d", "--no-verify",
                           "--index-dir", tmp_path / "i", "--model", tiny_model, "-q")
    assert_one_line_error(code, err, "refusing to load")
    assert not marker.exists()


@pytest.mark.parametrize("argv, needle", [
    (["search", "   "], "empty query"),
    (["search", "tractor", "-k", "0"], "k must be between 1 and the index size 200"),
    (["search", "tractor", "-k", "-3"], "k must be between 1 and the index size 200"),
    (["search", "tractor", "--grid", "out.gif"], "grid file must end in"),
    (["search", "tractor", "--model", "ViT-Q-99"], "unknown model 'ViT-Q-99'"),
    (["search", "tractor", "--template", "no placeholder"], "exactly one {}"),
])
def test_bad_queries(cli_index, capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree_digest(cli_index)
    code, _, err = run_cli(capsys, *argv, "--index-dir", cli_index)
    assert_one_line_error(code, err, needle)
    assert _tree_digest(cli_index) == before


def test_missing_and_half_written_index(tmp_path, cli_index, capsys):
    code, _, err = run_cli(capsys, "search", "tractor", "--index-dir", tmp_path / "none")
    assert_one_line_error(code, err, "no index at")
    half = tmp_path / "half"  # a format-1 index killed while it was being written
    half.mkdir()
    (half / "progress.json").write_text(json.dumps({"identity": {"count": 200}, "rows_done": 64}))
    code, _, err = run_cli(capsys, "search", "tractor", "--index-dir", half)
    assert_one_line_error(code, err, "incomplete (64 of 200 images embedded)")
    code, _, err = run_cli(capsys, "info", "--index-dir", half)
    assert_one_line_error(code, err, "incomplete")


def test_unknown_model_and_argparse_errors_are_one_line(tmp_path, cifar_root, capsys):
    code, _, err = run_cli(capsys, "index", "cifar100", "--data-dir", cifar_root, "--no-verify",
                           "--index-dir", tmp_path / "i", "--model", "ViT-Nope")
    assert_one_line_error(code, err, "unknown model 'ViT-Nope'")
    code, _, err = run_cli(capsys, "index", "cifar100", "--limit", "-3")
    assert_one_line_error(code, err, "must be at least 1")
    code, _, err = run_cli(capsys, "index", "imagenet")
    assert_one_line_error(code, err, "unknown source 'imagenet'")


# --------------------------------------------------------------------------- resume after a real kill


def _index_cmd(data_dir, out):
    return [sys.executable, "-m", "cliplens", "index", "cifar100", "--data-dir", str(data_dir), "--no-verify",
            "--index-dir", str(out), "--limit", "32", "--batch-size", "4", "--checkpoint-every", "1", "-q"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_embeddings(cifar_root, b32_weights, tmp_path):
    """A real subprocess with the real ViT-B-32-quickgelu (random weights via the openai hub path), SIGKILLed."""
    env = dict(os.environ)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_index_cmd(cifar_root, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def progress():  # the build's own scratch folder (cliplens.layout), whatever mkdtemp named it
        return next(iter(killed.glob(".build-*/progress.json")), killed / "progress.json")

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress().read_text())["rows_done"] >= 8:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress().read_text())["rows_done"]
    assert 8 <= done < 32
    r = subprocess.run([sys.executable, "-m", "cliplens", "search", "tractor", "--index-dir", str(killed)],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "incomplete" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_index_cmd(cifar_root, killed), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed at {done}" in r.stdout
    whole = tmp_path / "whole"
    r = subprocess.run(_index_cmd(cifar_root, whole), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed_files, whole_files = index_files(killed), index_files(whole)
    assert (killed_files / "embeddings.npy").read_bytes() == (whole_files / "embeddings.npy").read_bytes()
    assert (killed_files / "items.parquet").read_bytes() == (whole_files / "items.parquet").read_bytes()
    assert not list(killed.rglob("*.tmp")) and not list(killed.glob(".build-*"))  # nothing left behind


def test_search_with_a_template_file_ensembles_its_templates(cli_index, tiny_encoder, capsys, tmp_path):
    templates = tmp_path / "mine.txt"
    templates.write_text("# my prompts\na photo of a {}.\na blurry photo of the {}.\n")
    code, out, _ = run_cli(capsys, "search", "tulip", "--index-dir", cli_index, "-k", 5, "--templates", templates,
                           "--json")
    assert code == 0
    vecs = tiny_encoder.encode_texts(["a photo of a tulip.", "a blurry photo of the tulip."]).astype(np.float64)
    q = vecs.mean(axis=0)
    q /= np.linalg.norm(q)
    s = np.asarray(IndexStore.open(cli_index).embeddings, np.float64) @ q
    ref = sorted(range(len(s)), key=lambda i: (-s[i], i))[:5]
    assert [h["id"] for h in json.loads(out)["hits"]] == ref
