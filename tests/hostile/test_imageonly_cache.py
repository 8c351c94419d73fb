"""A damaged, interrupted or disagreeing image-only cache is never used and never fails a run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cliplens import imageonly  # noqa: E402


@pytest.fixture()
def built(tmp_path, tiny_model, monkeypatch):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")
    folder = imageonly.build_cache(encoder, root=tmp_path)
    assert folder is not None
    return tmp_path, folder, encoder


def _find(root, tiny_model):
    return imageonly.find(name=tiny_model, pretrained=None, weights=None, device="cpu", root=root)


@pytest.mark.parametrize("name", ["image.onnx", "image.onnx.weights"])
def test_a_truncated_graph_or_weights_file_is_ignored_with_a_warning(built, tiny_model, caplog, name):
    root, folder, _ = built
    damaged = folder / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 3])
    assert _find(root, tiny_model) is None
    assert "ignoring the image-only cache" in caplog.text


@pytest.mark.parametrize("meta", ["{not json", json.dumps({"format": 1}), json.dumps({"format": 99, "model": {}}),
                                  json.dumps([1, 2])])
def test_a_damaged_or_foreign_record_is_skipped(built, tiny_model, meta):
    root, folder, _ = built
    (folder / "meta.json").write_text(meta)
    assert _find(root, tiny_model) is None


def test_an_interrupted_build_leaves_nothing_that_is_used(built, tiny_model):
    root, folder, _ = built
    half = root / f".{folder.name}.tmp123"  # what a killed build leaves: no meta.json
    shutil.copytree(folder, half)
    (half / "meta.json").unlink()
    shutil.rmtree(folder)
    assert _find(root, tiny_model) is None


def test_a_tower_that_disagrees_is_not_cached(tmp_path, tiny_model, monkeypatch, caplog):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")
    real = imageonly.ImageOnlyEncoder.encode_pixels
    monkeypatch.setattr(imageonly.ImageOnlyEncoder, "encode_pixels",
                        lambda self, pixels: np.roll(real(self, pixels), 1, axis=1))  # wrong arithmetic
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    assert "differs from torch" in caplog.text
    assert list(tmp_path.iterdir()) == []  # the temporary folder went too


def test_an_export_failure_is_a_warning_not_an_error(tmp_path, tiny_model, monkeypatch, caplog):
    from cliplens.encoder import load_encoder

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    encoder = load_encoder(tiny_model, device="cpu")

    def broken(visual, path):
        path.write_bytes(b"half a graph")  # e.g. the disk filled up
        raise OSError(28, "No space left on device")

    from cliplens import vit_onnx

    monkeypatch.setattr(vit_onnx, "write_graph", broken)
    assert imageonly.build_cache(encoder, root=tmp_path) is None
    assert "could not prepare the image-only tower" in caplog.text and list(tmp_path.iterdir()) == []


# The first run's helper process (imageonly.prepare): whatever goes wrong, the run goes on with torch and nothing of
# the attempt stays on disk.

def _prepare(root, tiny_model):
    return imageonly.prepare(name=tiny_model, pretrained=None, weights=None, device="cpu", root=root, announce=False)


def test_a_prepared_tower_that_disagrees_is_not_cached_and_remembered(tmp_path, tiny_model, monkeypatch, caplog):
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    real = imageonly.ImageOnlyEncoder.encode_pixels
    monkeypatch.setattr(imageonly.ImageOnlyEncoder, "encode_pixels",
                        lambda self, pixels: np.roll(real(self, pixels), 1, axis=1))  # wrong arithmetic here
    assert _prepare(tmp_path, tiny_model) is None
    assert "differs from torch" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["declined"]  # no entry, no scratch; remembered
    [marker] = (tmp_path / "declined").iterdir()
    assert "differs from torch" in json.loads(marker.read_text())["message"]


def test_a_helper_that_dies_leaves_nothing_and_is_tried_again(tmp_path, tiny_model, monkeypatch, caplog):
    import subprocess

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    calls = []

    def killed(argv, **kwargs):  # e.g. the kernel's OOM killer: no result written
        calls.append(argv)
        return subprocess.CompletedProcess(argv, -9)

    monkeypatch.setattr(subprocess, "run", killed)
    assert _prepare(tmp_path, tiny_model) is None and _prepare(tmp_path, tiny_model) is None
    assert len(calls) == 2 and "exited with -9 and no result" in caplog.text
    assert list(tmp_path.iterdir()) == []

    def cannot_fork(argv, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "run", cannot_fork)
    assert _prepare(tmp_path, tiny_model) is None and "could not start the helper" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_prepare_stops_and_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    import subprocess

    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")

    def interrupted(argv, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path, tiny_model)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_preparing_is_a_warning_and_leaves_nothing(small_disk, tiny_model, monkeypatch, caplog):
    # its injected-failure twin: test_a_helper_that_dies_leaves_nothing_and_is_tried_again
    monkeypatch.setenv("CLIPLENS_IMAGE_ONLY", "1")
    assert _prepare(small_disk, tiny_model) is None  # the tiny tower's weights (1.2 MB) do not fit in 256 KiB
    assert "could not prepare the image-only tower" in caplog.text or "no result" in caplog.text
    assert list(small_disk.iterdir()) == []  # tried again next run, when there is room


def test_a_damaged_entry_is_replaced_by_the_next_first_run(built, tiny_model, monkeypatch, rng):
    root, folder, encoder = built
    weights = folder / "image.onnx.weights"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _find(root, tiny_model) is None  # passed over, with a warning
    ours = _prepare(root, tiny_model)
    assert ours is not None and ours.folder == folder
    assert sorted(p.name for p in root.iterdir()) == [folder.name]  # nothing set aside is left
    found = _find(root, tiny_model)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert found is not None and np.abs(found.encode_images(images) - encoder.encode_images(images)).max() <= 1e-5
